"""Errors of the data pipeline that the CLI prints as one line."""


class DataError(Exception):
    """Bad corpus, tokenizer or shard: the message names the file, field or shard."""
