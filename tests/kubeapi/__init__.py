"""A local Kubernetes API for tests: an emulator on kmock, its server, and fixtures."""
