"""What a run shows of itself: the metrics it declares once (`metrics`), throughput, MFU and memory
(`monitor`, `peaks`, `host_syncs`), progress lines and bars (`progress`), the CSV and W&B loggers
(`loggers`) and the summary written at its end (`summary`)."""
