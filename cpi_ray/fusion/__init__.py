"""Fusion: core transplant and SLERP merge of the task models (stage `fuse`).

`slerp` holds the math, `worker` the streaming per-shard merge an actor runs (numpy only),
`plan` the driver's checks and sharding, `stage` the Ray stage. Import submodules directly; this
package imports nothing so that actors stay light.
"""
