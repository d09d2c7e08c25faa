"""The live demo: a small flawed service BAM ships, benign traffic, a real attack, and the
orchestration of ``bam demo`` (embedded server, agent, timeline, report)."""
