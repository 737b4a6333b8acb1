"""llmroute data plane: the injected sidecar gateway."""
