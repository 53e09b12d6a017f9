"""One module per CLI command group; `ccproxy.cli` assembles them."""
