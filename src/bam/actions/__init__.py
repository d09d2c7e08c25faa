"""Executors of policy actions (the relying party's hands on the host).

When the server's verdict says *isolate*, *terminate* or *investigate*, the agent carries it
out through these modules: :mod:`bam.actions.vm` for QEMU guests over QMP (pause, resume,
quit, link down, memory dump for forensics); process and cgroup executors live beside it.
Each action returns a record of what was done, so the agent can report it back as evidence.
"""
