"""Weight sync from the trainer ranks to the vLLM engines, the whole protocol in one place.

records         what both ends agree on: parameter metadata, bucket plan, piece layout,
                the fingerprint that proves a sync intact
shared_memory   transport on one node: a /dev/shm segment, both ends
object_store    transport across nodes: Ray's object store, both ends
broadcast       transport over a torch.distributed group (gloo / NCCL), both ends
zero3           reading the weights out of a ZeRO-3 module, partitioned or gathered
trainer_end     `WeightSender`, mixed into the policy rank actor
engine_end      `WeightReceiver`, mixed into the rollout engine actor
vllm_extension  `WeightSyncExtension`, the methods that run inside each vLLM worker
driver          `WeightSync`, which drives a sync from the driver, with the protocol stated
"""
