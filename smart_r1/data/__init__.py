"""Scenarios in and out: WOMD TFRecords, Scenario protos, Parquet shards, the SUMO generator."""
