"""Measurements of a merged model against its unmerged self: FLOPs, latency, drift, reports, CI gate."""
