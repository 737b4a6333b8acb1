"""llmroute test suite."""
