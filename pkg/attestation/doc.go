// Package attestation is the attestation report shared by gpuaas-agent,
// gpuaas-controlplane and gpuaasctl: the report format and its canonical
// encoding, signing with the agent's SVID key, offline verification against
// a SPIFFE trust bundle, TPM quote verification, and the policy that turns a
// verified report into a verdict (PASS, FAIL or STALE, every check named
// with what was expected and what was found).
//
// Encoding. A report is canonical JSON: the UTF-8 output of encoding/json
// for the Report struct (fields in declaration order, no maps, no floats,
// every slice sorted, time in UTC RFC 3339). Decode accepts only bytes that
// re-encode to exactly themselves, so duplicate keys, case-folded keys,
// whitespace and unknown fields are rejected and one report has one byte
// form. JSON rather than deterministic protobuf because protobuf's
// deterministic mode is explicitly not canonical across implementations
// and versions, and because a security team must be able to read the
// signed bytes and check the signature with nothing but jq and openssl.
//
// Signing. The signature is ECDSA (or RSA PKCS#1 v1.5) over SHA-256 of the
// exact report bytes, made with the agent's X509-SVID private key, and is
// carried with the SVID chain in a small JSON envelope. The bytes fit the
// session's ChallengeResponse: report = the canonical report, signature =
// the envelope, nonce = the challenge nonce. A saved report is the
// protojson form of that message.
//
// TPM. When the node has a TPM the report carries a TPM2_Quote over
// selected SHA-256 PCRs whose qualifying data is SHA-256(nonce ||
// SHA-256(report encoded without the quote)), binding the quote to this
// challenge and to every other field of the report.
//
// Telemetry. Each agent process generates an Ed25519 telemetry key in
// memory (never on disk) and puts its public half in every report
// (AgentEvidence.TelemetryKey), so the SVID signature over the report
// vouches for it. Telemetry reports are signed with that key: Ed25519 over
// "gpuaas.telemetry/v1\n" || SHA-256 of the exact payload bytes (a
// TelemetryPayload in protobuf wire form, verified before it is decoded, so
// no canonical re-encoding is involved; the control plane then reads only
// the header and the lease ids, VerifyTelemetryHeader). Ed25519 rather than the SVID's ECDSA key
// because a control plane verifies a report per node per interval and
// Ed25519 verifies faster; the binding to the attested identity is the
// report's signature over the key. Replay, ordering and lease attribution
// are the verifier's state (controlplane/fleet).
//
// What it must never do: accept a report whose bytes are not canonical, a
// signer that does not chain to the bundle or is not the agent of the
// report's node; silently drop a check or an evidence field (absent
// evidence is a stated status, never an empty field); import agent or
// controlplane code.
package attestation
