"""Put on PYTHONPATH by a fault test, so every process imports it at start-up: the rank named by
LMREFINERY_TEST_KILL_RANK SIGKILLs itself inside the save of checkpoint LMREFINERY_TEST_KILL_STEP — after its shard
file is written, before the checkpoint's state, checksums and rename."""

import os

if os.environ.get("LMREFINERY_TEST_KILL_STEP") and \
        os.environ.get("RANK", "0") == os.environ.get("LMREFINERY_TEST_KILL_RANK", "0"):
    import signal

    from torch.distributed.checkpoint import hf_storage

    _partial = f".step-{os.environ['LMREFINERY_TEST_KILL_STEP']}.tmp-partial"
    _write_data = hf_storage.HuggingFaceStorageWriter.write_data

    def _write_then_die(self, plan, planner):
        result = _write_data(self, plan, planner)
        if _partial in str(self.path):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    hf_storage.HuggingFaceStorageWriter.write_data = _write_then_die
