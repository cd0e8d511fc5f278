"""The sample fleet: backends, their launcher, load generators and live scenarios."""
