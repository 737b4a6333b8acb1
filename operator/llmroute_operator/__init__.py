"""llmroute control plane: the kopf operator."""
