"""Test helpers shipped with ccproxy: fake backends for unit and integration tests."""
