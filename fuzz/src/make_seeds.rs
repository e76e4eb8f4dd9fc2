//! Seed corpora from the real formats: every frame kind as our encoder writes it, the shipped
//! policies and the broken-policy fixtures, and annotation sets like the README's. Run from
//! `fuzz/`; writes `corpus/<target>/` (not committed: cargo-fuzz grows it).

use std::fs;
use std::path::Path;

use automigrate_transfer::wire::{
    ErrorCode, Frame, Hello, Intent, ManifestEntry, ManifestStart, PROTOCOL_VERSION, PieceRange,
    UnitBody, UnitStart, Welcome,
};

fn main() -> std::io::Result<()> {
    frames(Path::new("corpus/transfer_frame"))?;
    policies(Path::new("corpus/policy"))?;
    alertmanager(Path::new("corpus/alertmanager"))?;
    Ok(())
}

fn frames(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    // Any fixed 32 bytes: the decoder does not check ids against anything.
    let id = [7u8; 32];
    let frames = vec![
        Frame::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            intent: Intent::Open { transfer_id: id },
        }),
        Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
            intent: Intent::Join {
                transfer_id: id,
                session: 7,
            },
        }),
        Frame::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            session: 7,
        }),
        Frame::ManifestStart(ManifestStart {
            target: "checkpoints/default/trainer".into(),
            chunk_size: 4 << 20,
            files: 2,
            dirs: 1,
            total_bytes: 5 << 20,
        }),
        Frame::ManifestEntry(ManifestEntry::Dir {
            path: "data".into(),
            mode: 0o755,
        }),
        Frame::ManifestEntry(ManifestEntry::File {
            path: "data/part-0000.bin".into(),
            size: 5 << 20,
            mode: 0o644,
            hash: id,
        }),
        Frame::ChunkHashes(vec![id, id]),
        Frame::ManifestEnd,
        Frame::Have {
            ranges: vec![PieceRange { start: 0, count: 3 }],
            last: true,
        },
        Frame::UnitStart(UnitStart {
            unit: 1,
            body: UnitBody::Chunk { file: 0, index: 1 },
        }),
        Frame::UnitStart(UnitStart {
            unit: 2,
            body: UnitBody::Pack {
                files: vec![1, 2, 3],
            },
        }),
        Frame::Data(bytes::Bytes::from_static(b"training data")),
        Frame::Ack { unit: 1 },
        Frame::Nack { unit: 2, file: 3 },
        Frame::Received { bytes: 1 << 20 },
        Frame::Done,
        Frame::Complete {
            files: 2,
            bytes: 5 << 20,
        },
        Frame::Missing {
            ranges: vec![PieceRange { start: 4, count: 1 }],
            last: false,
        },
        Frame::Error {
            code: ErrorCode::Other(9),
            message: "disk full".into(),
        },
    ];
    let mut all = Vec::new();
    for (n, frame) in frames.iter().enumerate() {
        let mut one = Vec::new();
        frame
            .encode(&mut one)
            .map_err(|error| std::io::Error::other(error.to_string()))?;
        fs::write(dir.join(format!("frame-{n:02}")), &one)?;
        all.extend_from_slice(&one);
    }
    // A whole conversation in one input, so the decoder's loop is exercised too.
    fs::write(dir.join("conversation"), all)
}

fn policies(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    for folder in [
        "../policies",
        "../tests/fixtures/broken-policies",
        "../simulations/policies",
    ] {
        let Ok(entries) = fs::read_dir(folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let text = fs::read_to_string(&path)?;
            // The policy body is the ConfigMap's `policy.yaml` block: take the indented lines
            // after it, unindented, so the seed is what the parser really sees.
            let body = policy_body(&text).unwrap_or(text.clone());
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("policy");
            let folder_tag = folder.trim_start_matches("../").replace('/', "-");
            fs::write(dir.join(format!("{folder_tag}-{name}")), body)?;
        }
    }
    Ok(())
}

fn policy_body(configmap: &str) -> Option<String> {
    let mut lines = configmap
        .lines()
        .skip_while(|line| !line.contains("policy.yaml: |"));
    lines.next()?;
    let body: Vec<&str> = lines
        .take_while(|line| line.starts_with("    ") || line.is_empty())
        .collect();
    Some(
        body.iter()
            .map(|line| line.get(4..).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// Webhook bodies as Alertmanager 0.27 sends them (payload version 4).
fn alertmanager(dir: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let firing = serde_json::json!({
        "version": "4",
        "groupKey": "{}:{node=\"edge-1\"}",
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "automigrate",
        "groupLabels": {"node": "edge-1"},
        "commonLabels": {"alertname": "NodeDiskFailing", "node": "edge-1"},
        "commonAnnotations": {"summary": "edge-1 has a read-only filesystem"},
        "externalURL": "http://alertmanager:9093",
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "NodeDiskFailing", "node": "edge-1", "severity": "warning"},
            "annotations": {"summary": "edge-1 has a read-only filesystem"},
            "startsAt": "2026-11-22T10:00:00.000Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph",
            "fingerprint": "c2f1e7a1b3d4e5f6"
        }, {
            "status": "resolved",
            "labels": {"alertname": "TrainingStalled", "namespace": "research", "pod": "trainer-0"},
            "annotations": {},
            "startsAt": "2026-11-22T09:00:00Z",
            "endsAt": "2026-11-22T09:30:00Z",
            "generatorURL": "",
            "fingerprint": "0a1b2c3d4e5f6071"
        }]
    });
    fs::write(
        dir.join("firing-and-resolved.json"),
        serde_json::to_vec_pretty(&firing)?,
    )?;
    let mut minimal = firing.clone();
    minimal["alerts"] = serde_json::json!([{"status": "firing", "labels": {"alertname": "X"}}]);
    fs::write(dir.join("minimal.json"), serde_json::to_vec(&minimal)?)?;
    Ok(())
}
