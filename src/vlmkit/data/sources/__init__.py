"""Where training records come from besides one JSON file: WebDataset tar shards and Parquet files (read
lazily, `shards`), the order a rank reads them in (`stream`) and `vlmkit data shard`'s writer (`writer`)."""
