"""Hyperfleet from Python: a machine deleted when the block ends, commands
(buffered and streamed), files, suspend/resume, and its history.

    pip install ./sdk/python
    export HYPERFLEET_URL=http://127.0.0.1:3000 HYPERFLEET_API_KEY=hf_...
    python sdk/python/examples/quickstart.py

The code below this docstring is the repository README's "Use it from code"
Python example, verbatim (tests/test_readme.py keeps the two equal).
"""

from hyperfleet import Hyperfleet

hf = Hyperfleet()  # HYPERFLEET_URL and HYPERFLEET_API_KEY, like the CLI

with hf.machines.create(mem_size_mib=256, start=True, timeout=300) as m:  # deleted at the end
    r = m.exec(["uname", "-a"])
    print(r.exit_code, r.stdout.strip())

    for out in m.exec_stream("for i in 1 2 3; do echo tick $i; sleep 0.2; done"):
        if out.type == "stdout":  # output as it comes; the last event is the exit
            print(out.text, end="")

    m.files.write("/root/hello.txt", "hello from python\n")
    print(m.files.read("/root/hello.txt").decode(), end="")

    m.suspend()  # memory to disk; resume continues where it was
    m.resume()
    print(m.exec("cat /root/hello.txt").stdout, end="")

    for ev in m.events():  # every transition, with its step timings
        if ev.kind == "transition":
            steps = ", ".join(f"{s.step} {s.duration_ms:.0f} ms" for s in ev.steps)
            print(f"{ev.from_status} -> {ev.to_status}", steps)
