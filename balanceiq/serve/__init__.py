"""Ray Serve application: the Policy and Controller deployments, the API and the dashboard."""
