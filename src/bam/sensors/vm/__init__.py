"""QEMU guests as workloads: an in-guest syscall stream with no agent inside, plus the host view.

* :mod:`~bam.sensors.vm.image` builds the guest (Debian cloud kernel + busybox initramfs whose
  ``/init`` streams the guest kernel's tracefs ring buffer to a serial port);
* :mod:`~bam.sensors.vm.launch` starts it under QEMU (KVM where usable, else TCG) with QMP;
* :mod:`~bam.sensors.vm.qmp` is a thread-safe synchronous QMP client (``qemu.qmp``);
* :mod:`~bam.sensors.vm.stream` decodes the guest's stream into :class:`~bam.events.SyscallBatch`
  and counts every loss;
* :mod:`~bam.sensors.vm.resources` samples the QEMU process, vCPU threads, block and NICs;
* :mod:`~bam.sensors.vm.record` records both for ``bam record --vm``.

Policy actions on a VM (pause, resume, terminate, link down, memory dump) are in
:mod:`bam.actions.vm`.
"""
