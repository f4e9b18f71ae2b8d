"""The toy world: procedurally drawn scenes that make small models hallucinate the way LLaVA
does."""
