# BAM default appraisal policy (Rego v1).
#
# The server queries data.bam.policy.decision with the input described in docs/server.md
# (trigger, agent, workload, evidence, measurements, behavior) and expects:
#   {"status": "affirming"|"warning"|"contraindicated"|"none",
#    "action": "allow"|"monitor"|"investigate"|"isolate"|"terminate",
#    "reasons": [string], "trust_vector": {AR4SI claim: int}, "clear_hold": bool}
# Every finding below adds one reason with a status and an action; the decision takes the
# worst status and the strongest action among them.
package bam.policy

import rego.v1

# Classifier labels that mean an attack, not just an unusual workload.
malicious_labels := {
	"malware", "exploit", "backdoor", "reverse_shell", "ransomware", "cryptominer",
	"privilege_escalation", "web_shell", "rootkit", "exfiltration",
}

# Files that define what boots: a mismatch there is contraindicated boot (AR4SI 96).
boot_roles := {"kernel", "initrd", "firmware"}

# Behaviour fields are read one by one (input.behavior is null when the agent sent none): the
# server gives a policy only the input paths it references, and caches decisions on them, so
# naming the three fields used here keeps raw scores out of the cache key.
severity := s if {
	s := input.behavior.severity
} else := "none"

label := l if {
	l := input.behavior.label
} else := null

raw_probability := p if {
	p := input.behavior.probability
} else := 0

probability := raw_probability if is_number(raw_probability)
else := 0

# --- findings: {"reason", "status", "action"} -------------------------------------------------

findings contains {"reason": sprintf("measurement_mismatch: %s", [m.path]), "status": "contraindicated", "action": "isolate"} if {
	some m in input.measurements.mismatches
}

findings contains {"reason": sprintf("deleted_file_mapped: %s", [p]), "status": "warning", "action": "investigate"} if {
	some p in input.measurements.deleted
}

findings contains {"reason": "behavior_severity_critical", "status": "contraindicated", "action": "isolate"} if {
	severity == "critical"
}

findings contains {"reason": "behavior_severity_high", "status": "contraindicated", "action": "investigate"} if {
	severity == "high"
}

findings contains {"reason": "behavior_severity_medium", "status": "warning", "action": "monitor"} if {
	severity == "medium"
}

findings contains {"reason": sprintf("classifier_label_malicious: %s", [label]), "status": "contraindicated", "action": "terminate"} if {
	label in malicious_labels
	probability >= 0.8
}

findings contains {"reason": sprintf("classifier_label_suspicious: %s", [label]), "status": "warning", "action": "investigate"} if {
	label != null
	label != "normal"
	not label_is_confident_malicious
	probability >= 0.5
}

label_is_confident_malicious if {
	label in malicious_labels
	probability >= 0.8
}

findings contains {"reason": sprintf("threat_intel: %s is %s (%s)", [m.path, m.name, m.indicator]), "status": "contraindicated", "action": "isolate"} if {
	some m in input.intel.matches
}

findings contains {"reason": sprintf("chain_gap: %d token(s) missing", [input.evidence.chain_missing]), "status": "warning", "action": "monitor"} if {
	input.evidence.chain_gap
}

findings contains {"reason": "chain_reset: an operator reset this agent's evidence chain; this token starts a new one", "status": "warning", "action": "investigate"} if {
	input.evidence.chain_reset
}

findings contains {"reason": "stale: no evidence within the reporting interval", "status": "warning", "action": "investigate"} if {
	input.workload.stale
}

# --- decision ----------------------------------------------------------------------------------

worst_status := "contraindicated" if {
	some f in findings
	f.status == "contraindicated"
} else := "warning" if {
	some f in findings
	f.status == "warning"
} else := "affirming"

strongest_action := "terminate" if {
	some f in findings
	f.action == "terminate"
} else := "isolate" if {
	some f in findings
	f.action == "isolate"
} else := "investigate" if {
	some f in findings
	f.action == "investigate"
} else := "monitor" if {
	some f in findings
	f.action == "monitor"
} else := "allow"

reasons := sort([f.reason | some f in findings])

mismatch_boot if {
	some m in input.measurements.mismatches
	m.role in boot_roles
}

# AR4SI trustworthiness vector: behaviour maps onto "executables".
executables := 96 if mismatch_boot
else := 33 if worst_status == "contraindicated"
else := 32 if worst_status == "warning"
else := 2 if input.trigger == "evidence"
else := 0

file_system := 96 if count(input.measurements.mismatches) > 0
else := 2 if input.measurements.reference
else := 0

hardware := 2 if input.evidence.tpm
else := 0

instance_identity := 2 if input.trigger == "evidence"
else := 0

decision := {
	"status": worst_status,
	"action": strongest_action,
	"reasons": reasons,
	"trust_vector": {
		"instance-identity": instance_identity,
		"executables": executables,
		"file-system": file_system,
		"hardware": hardware,
	},
	"clear_hold": false,
}
