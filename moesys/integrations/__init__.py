"""Explicit integrations with other libraries (nothing here runs on `import moesys`)."""
