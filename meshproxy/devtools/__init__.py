"""Developer tools: a toy KServe v2 runtime for demos, tests and the bench."""
