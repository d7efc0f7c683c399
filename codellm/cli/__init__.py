"""Click commands only: parse, call the library, print."""
