"""Sources of input messages: files (replay), and adapters added per technology."""
