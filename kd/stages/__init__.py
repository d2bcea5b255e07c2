"""One module per CLI stage. Each is thin: it parses flags, builds objects and calls the library."""
