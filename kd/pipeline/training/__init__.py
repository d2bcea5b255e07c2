"""Stage two's wing: the order of the data, the streaming loader, prepared corpora."""
