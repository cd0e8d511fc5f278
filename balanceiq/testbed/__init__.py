"""The live side: Envoy bootstraps, LiveEnv, live evaluation and exploration recordings on a real fleet."""
