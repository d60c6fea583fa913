"""Files that move: file-system rounds and the stop-copy tar stream."""
