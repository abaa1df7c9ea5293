# gdb script for bench/layout/train.sh: run the program given to gdb and
# append to $TRACE_OUT the name of each function of the program the first
# time it runs (one breakpoint per function symbol, disabled when it fires,
# so the program then runs at full speed).
import os
import subprocess

import gdb

binary = gdb.current_progspace().filename
out = open(os.environ["TRACE_OUT"], "a")

functions = []
nm = subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True, check=True)
for line in nm.stdout.splitlines():
    # Sizeless ones too: the C start-up code (frame_dummy, ...) runs as well.
    fields = line.split()
    if len(fields) == 3 and fields[1] in ("t", "T"):
        functions.append((int(fields[0], 16), fields[2]))

for command in (
    "set pagination off",
    "set confirm off",
    "set print thread-events off",
    "handle SIGPIPE nostop noprint pass",
    "handle SIGTERM nostop noprint pass",
    "handle SIGINT nostop noprint pass",
    "starti",
):
    gdb.execute(command, to_string=True)

# The program is position-independent: find where its image was mapped.
base = None
for line in gdb.execute("info proc mappings", to_string=True).splitlines():
    fields = line.split()
    if fields and fields[-1] == binary:
        base = int(fields[0], 16)
        break
if base is None:
    raise gdb.GdbError(f"{binary} is not mapped")


class FirstCall(gdb.Breakpoint):
    def __init__(self, address, name):
        super().__init__(f"*{base + address:#x}", internal=True)
        self.name = name

    def stop(self):
        out.write(self.name + "\n")
        out.flush()
        self.enabled = False
        return False


for address, name in functions:
    FirstCall(address, name)
gdb.execute("continue")
