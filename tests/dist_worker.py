"""`lines-fast` for the distributed tests, with a fault injected into one rank (the test's own
code, never the package's): TEST_DIE_RANK=r kills rank r (os._exit) right after it finishes
its first shard; TEST_FAIL_RANK=r makes rank r's first tensor write fail as a full disk does."""
import errno
import os
import sys

from lines_fast import writer
from lines_fast.cli import main

rank = int(os.environ.get("RANK", "0"))

if rank == int(os.environ.get("TEST_DIE_RANK", "-1")):
    close_shard = writer.ShardedWriter._close_shard

    def close_then_die(self, shard):
        close_shard(self, shard)
        os._exit(9)
    writer.ShardedWriter._close_shard = close_then_die

if rank == int(os.environ.get("TEST_FAIL_RANK", "-1")):
    def disk_full(tensor):
        raise OSError(errno.ENOSPC, "No space left on device")
    writer._tensor_bytes = disk_full

sys.exit(main())
