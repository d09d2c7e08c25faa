"""BAM, the Behavioral Attestation Module: learn, watch, score and attest workload behaviour."""

__version__ = "0.1.0"
