"""Expert parallelism: shard experts over a DeviceMesh's `ep` dimension and move tokens between ranks."""
