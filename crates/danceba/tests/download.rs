//! `danceba download` against a local mock of the Hugging Face hub (127.0.0.1 only) serving the
//! tiny golden checkpoints the way the hub does: the tree listing API, `resolve` URLs that
//! redirect to a CDN path with ETag/Content-Length/Range support and X-Repo-Commit; including a
//! connection cut mid-file (resumed with a Range request), a token, and weights resolution.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use danceba::weights::{self, DownloadOptions, HubConfig, GPT_DIR, VQVAE_PATH};
use danceba_model::arch::ModelKind;
use sha2::{Digest, Sha256};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn golden() -> PathBuf {
    match std::env::var_os("DANCEBA_GOLDEN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/golden"
        )),
    }
}

#[derive(Clone, Debug)]
struct Req {
    path: String,
    headers: HashMap<String, String>,
}

struct MockHub {
    port: u16,
    requests: Arc<Mutex<Vec<Req>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone)]
struct Behaviour {
    files: HashMap<String, Vec<u8>>,
    /// Paths whose first body transfer is cut after half the bytes.
    cut_once: Arc<Mutex<Vec<String>>>,
    token: Option<String>,
    /// Answer every CDN request with a cut (to test giving up).
    always_cut: bool,
}

impl MockHub {
    fn start(b: Behaviour) -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r2, s2) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: stops when told, or after 120 s.
            let deadline = Instant::now() + Duration::from_secs(120);
            while !s2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).ok();
                        stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
                        let (b, r) = (b.clone(), r2.clone());
                        std::thread::spawn(move || serve(stream, &b, &r));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        MockHub {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn requests(&self) -> Vec<Req> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut h = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    let _ = s.write_all(h.as_bytes());
    let _ = s.write_all(body);
    let _ = s.flush();
}

fn serve(mut stream: TcpStream, b: &Behaviour, log: &Mutex<Vec<Req>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l).is_err() || l.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    log.lock().unwrap().push(Req {
        path: path.clone(),
        headers: headers.clone(),
    });
    if let Some(t) = &b.token {
        let want = format!("Bearer {t}");
        if !path.starts_with("/cdn/") && headers.get("authorization") != Some(&want) {
            respond(
                &mut stream,
                "401 Unauthorized",
                &[("X-Error-Message", "Invalid credentials".into())],
                b"",
            );
            return;
        }
    }
    let api = "/api/datasets/fancongyi/danceba/tree/main/";
    let resolve = "/datasets/fancongyi/danceba/resolve/main/";
    if let Some(dir) = path.strip_prefix(api) {
        let mut entries: Vec<serde_json::Value> = Vec::new();
        for (p, data) in &b.files {
            if p.rsplit_once('/').map(|(d, _)| d) == Some(dir) {
                entries.push(serde_json::json!({
                    "type": "file", "oid": "deadbeef", "size": data.len(), "path": p,
                    "lfs": {"oid": sha256_hex(data), "size": data.len(), "pointerSize": 134}
                }));
            }
        }
        if entries.is_empty() {
            respond(
                &mut stream,
                "404 Not Found",
                &[("X-Error-Message", "Entry not found".into())],
                b"",
            );
            return;
        }
        entries.push(serde_json::json!({"type": "directory", "oid": "x", "size": 0, "path": format!("{dir}/sub")}));
        let body = serde_json::to_vec(&entries).unwrap();
        respond(
            &mut stream,
            "200 OK",
            &[
                ("Content-Type", "application/json".into()),
                ("Content-Length", body.len().to_string()),
            ],
            &body,
        );
    } else if let Some(p) = path.strip_prefix(resolve) {
        match b.files.get(p) {
            Some(data) => respond(
                &mut stream,
                "302 Found",
                &[
                    ("Location", format!("/cdn/{p}?X-Amz-Signature=abc")),
                    ("X-Repo-Commit", COMMIT.into()),
                    ("X-Linked-Etag", format!("\"{}\"", sha256_hex(data))),
                    ("X-Linked-Size", data.len().to_string()),
                    ("Content-Length", "0".into()),
                ],
                b"",
            ),
            None => respond(
                &mut stream,
                "404 Not Found",
                &[("X-Error-Message", "Entry not found".into())],
                b"",
            ),
        }
    } else if let Some(p) = path.strip_prefix("/cdn/") {
        let p = p.split('?').next().unwrap_or("");
        let Some(data) = b.files.get(p) else {
            respond(&mut stream, "404 Not Found", &[], b"");
            return;
        };
        let start: usize = headers
            .get("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let etag = ("ETag", format!("\"{}\"", sha256_hex(data)));
        if start >= data.len() {
            respond(
                &mut stream,
                "416 Range Not Satisfiable",
                &[("Content-Range", format!("bytes */{}", data.len()))],
                b"",
            );
            return;
        }
        let body = &data[start..];
        let (status, mut hs) = if start > 0 {
            (
                "206 Partial Content",
                vec![(
                    "Content-Range",
                    format!("bytes {start}-{}/{}", data.len() - 1, data.len()),
                )],
            )
        } else {
            ("200 OK", vec![])
        };
        hs.push(etag);
        hs.push(("Accept-Ranges", "bytes".into()));
        hs.push(("Content-Length", body.len().to_string()));
        let cut = b.always_cut || {
            let mut c = b.cut_once.lock().unwrap();
            match c.iter().position(|x| x == p) {
                Some(i) => {
                    c.remove(i);
                    true
                }
                None => false,
            }
        };
        if cut {
            // Promise the whole body, send half, hang up.
            respond(&mut stream, status, &hs, &body[..body.len() / 2]);
            let _ = stream.shutdown(std::net::Shutdown::Both);
        } else {
            respond(&mut stream, status, &hs, body);
        }
    } else {
        respond(&mut stream, "404 Not Found", &[], b"");
    }
    let _ = reader.read(&mut [0u8; 0]);
}

fn tiny_files() -> HashMap<String, Vec<u8>> {
    let g = golden().join("model");
    let mut m = HashMap::new();
    m.insert(
        format!("{GPT_DIR}/epoch_0.pt"),
        std::fs::read(g.join("tiny_gpt.pt")).unwrap(),
    );
    // A second, older epoch that must not be picked (the official config uses epoch_0).
    m.insert(
        format!("{GPT_DIR}/epoch_300.pt"),
        std::fs::read(g.join("tiny_vqvae.pt")).unwrap(),
    );
    m.insert(
        VQVAE_PATH.to_string(),
        std::fs::read(g.join("tiny_vqvae.pt")).unwrap(),
    );
    m
}

fn config(hub: &MockHub, home: &Path, token: Option<&str>) -> HubConfig {
    HubConfig {
        endpoint: hub.endpoint(),
        token: token.map(str::to_string),
        hub_cache: home.join("hub"),
        repo_id: "fancongyi/danceba".into(),
        revision: "main".into(),
    }
}

#[test]
fn download_resumes_after_a_cut_connection_then_converts() {
    let files = tiny_files();
    let hub = MockHub::start(Behaviour {
        files: files.clone(),
        cut_once: Arc::new(Mutex::new(vec![
            format!("{GPT_DIR}/epoch_0.pt"),
            VQVAE_PATH.to_string(),
        ])),
        token: Some("hf_secret".into()),
        always_cut: false,
    });
    let home = tempfile::tempdir().unwrap();
    let cfg = config(&hub, home.path(), Some("hf_secret"));
    let conv = home.path().join("converted");
    let mut seen = Vec::new();
    let mut progress =
        |p: &str, done: u64, total: Option<u64>| seen.push((p.to_string(), done, total));
    let report = weights::download(
        &cfg,
        &DownloadOptions {
            converted_dir: Some(conv.clone()),
            ..Default::default()
        },
        &mut progress,
    )
    .unwrap();

    // The files landed in the hub cache layout, byte-identical, at the commit's snapshot.
    let snap = cfg.repo_cache().join("snapshots").join(COMMIT);
    assert_eq!(report.commit, COMMIT);
    assert_eq!(report.official.gpt, snap.join(GPT_DIR).join("epoch_0.pt"));
    assert_eq!(
        std::fs::read(&report.official.gpt).unwrap(),
        files[&format!("{GPT_DIR}/epoch_0.pt")]
    );
    assert_eq!(
        std::fs::read(&report.official.vqvae).unwrap(),
        files[VQVAE_PATH]
    );
    assert_eq!(
        std::fs::read_to_string(cfg.repo_cache().join("refs/main")).unwrap(),
        COMMIT
    );
    assert!(!snap.join(GPT_DIR).join("epoch_300.pt").exists());
    // No leftovers.
    let parts: Vec<_> = walk(home.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".part"))
        .collect();
    assert!(parts.is_empty(), "{parts:?}");

    // Each cut file was resumed with a Range request from where it stopped, and the token was sent.
    let reqs = hub.requests();
    for f in [format!("{GPT_DIR}/epoch_0.pt"), VQVAE_PATH.to_string()] {
        let len = files[&f].len();
        let ranges: Vec<_> = reqs
            .iter()
            .filter(|r| r.path.starts_with(&format!("/cdn/{f}")))
            .map(|r| r.headers.get("range").cloned())
            .collect();
        assert_eq!(
            ranges,
            vec![None, Some(format!("bytes={}-", len / 2))],
            "{f}"
        );
    }
    assert!(reqs
        .iter()
        .filter(|r| !r.path.starts_with("/cdn/"))
        .all(|r| r.headers.get("authorization").map(String::as_str) == Some("Bearer hf_secret")));
    // Progress reached the full size of each file.
    for f in [format!("{GPT_DIR}/epoch_0.pt"), VQVAE_PATH.to_string()] {
        let n = files[&f].len() as u64;
        assert!(
            seen.iter()
                .any(|(p, d, t)| *p == f && *d == n && *t == Some(n)),
            "{f}"
        );
    }

    // Converted once, and the converted directory resolves as weights.
    let converted = report.converted.unwrap();
    assert!(converted.gpt.is_file() && converted.vqvae.is_file());
    assert_eq!(weights::resolve(Some(&conv)).unwrap(), converted);
    // The hub cache resolves too (official layout).
    assert_eq!(weights::from_hub_cache(&cfg).unwrap(), report.official);

    // A second run reuses everything and downloads nothing.
    let download_again = || {
        weights::download(
            &cfg,
            &DownloadOptions {
                converted_dir: Some(conv.clone()),
                ..Default::default()
            },
            &mut |_, _, _| {},
        )
        .unwrap()
    };
    let before = hub.requests().len();
    let again = download_again();
    assert_eq!(again.reused.len(), 2);
    assert!(hub.requests()[before..]
        .iter()
        .all(|r| !r.path.starts_with("/cdn/")));

    // Damage is repaired, not reported as ready: a converted file that is not this checkpoint's
    // conversion is converted again, and a cached official file of the right size whose SHA-256
    // is not the hub's is fetched again.
    let is_gpt_conversion = || {
        weights::is_conversion_of(&converted.gpt, &report.official.gpt, ModelKind::Gpt, None)
            .unwrap()
    };
    assert!(is_gpt_conversion());
    std::fs::write(&converted.gpt, b"junk").unwrap();
    assert!(!is_gpt_conversion());
    let vq_len = files[VQVAE_PATH].len();
    std::fs::write(&report.official.vqvae, vec![b'x'; vq_len]).unwrap();
    let before = hub.requests().len();
    let repaired = download_again();
    assert_eq!(repaired.reused, std::slice::from_ref(&report.official.gpt));
    assert_eq!(
        std::fs::read(&report.official.vqvae).unwrap(),
        files[VQVAE_PATH]
    );
    assert!(hub.requests()[before..]
        .iter()
        .any(|r| r.path.starts_with(&format!("/cdn/{VQVAE_PATH}"))));
    assert!(is_gpt_conversion());
    // a conversion of another checkpoint (here the VQ-VAE's, put in the GPT's place) is not
    // taken for this one's either
    std::fs::copy(&converted.vqvae, &converted.gpt).unwrap();
    assert!(!is_gpt_conversion());
    download_again();
    assert!(is_gpt_conversion());
}

#[test]
fn an_interrupted_run_leaves_a_part_file_that_the_next_run_resumes() {
    let files = tiny_files();
    let home = tempfile::tempdir().unwrap();
    let gpt = format!("{GPT_DIR}/epoch_0.pt");
    {
        let hub = MockHub::start(Behaviour {
            files: files.clone(),
            cut_once: Arc::new(Mutex::new(vec![])),
            token: None,
            always_cut: true,
        });
        let cfg = config(&hub, home.path(), None);
        let err = weights::download(
            &cfg,
            &DownloadOptions {
                no_convert: true,
                ..Default::default()
            },
            &mut |_, _, _| {},
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("run `danceba download` again"),
            "{err}"
        );
    }
    let parts: Vec<_> = walk(home.path())
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".part"))
        .collect();
    assert_eq!(parts.len(), 1, "{parts:?}");
    let part_len = std::fs::metadata(&parts[0]).unwrap().len();
    assert!(part_len > 0 && part_len < files[&gpt].len() as u64);

    let hub = MockHub::start(Behaviour {
        files: files.clone(),
        cut_once: Arc::new(Mutex::new(vec![])),
        token: None,
        always_cut: false,
    });
    let cfg = config(&hub, home.path(), None);
    let report = weights::download(
        &cfg,
        &DownloadOptions {
            no_convert: true,
            ..Default::default()
        },
        &mut |_, _, _| {},
    )
    .unwrap();
    assert_eq!(std::fs::read(&report.official.gpt).unwrap(), files[&gpt]);
    let first_gpt = hub
        .requests()
        .into_iter()
        .find(|r| r.path.starts_with(&format!("/cdn/{gpt}")))
        .unwrap();
    assert_eq!(
        first_gpt.headers.get("range"),
        Some(&format!("bytes={part_len}-"))
    );
}

#[test]
fn a_missing_token_and_a_wrong_endpoint_give_clear_errors() {
    let hub = MockHub::start(Behaviour {
        files: tiny_files(),
        cut_once: Arc::new(Mutex::new(vec![])),
        token: Some("hf_secret".into()),
        always_cut: false,
    });
    let home = tempfile::tempdir().unwrap();
    let err = weights::download(
        &config(&hub, home.path(), None),
        &DownloadOptions::default(),
        &mut |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("HF_TOKEN"), "{err}");
    drop(hub);
    // Nothing listens on port 9 of localhost.
    let cfg = HubConfig {
        endpoint: "http://127.0.0.1:9".into(),
        token: None,
        hub_cache: home.path().join("hub"),
        repo_id: "fancongyi/danceba".into(),
        revision: "main".into(),
    };
    let err = weights::download(&cfg, &DownloadOptions::default(), &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("HF_ENDPOINT"), "{err}");
    // the URL once: ureq's own message starts with it too
    assert_eq!(err.matches("http://127.0.0.1:9/").count(), 1, "{err}");
}

#[test]
fn wrong_weights_are_refused_by_the_audit() {
    // The hub serves a VQ-VAE where the GPT should be.
    let mut files = tiny_files();
    files.insert(format!("{GPT_DIR}/epoch_0.pt"), files[VQVAE_PATH].clone());
    let hub = MockHub::start(Behaviour {
        files,
        cut_once: Arc::new(Mutex::new(vec![])),
        token: None,
        always_cut: false,
    });
    let home = tempfile::tempdir().unwrap();
    let cfg = config(&hub, home.path(), None);
    for no_convert in [true, false] {
        let err = weights::download(
            &cfg,
            &DownloadOptions {
                no_convert,
                converted_dir: Some(home.path().join("c")),
                ..Default::default()
            },
            &mut |_, _, _| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.to_lowercase().contains("vqvae") || err.to_lowercase().contains("vq-vae"),
            "{err}"
        );
    }
    assert!(!home.path().join("c").join("gpt.safetensors").exists());
}

#[test]
fn the_cli_downloads_with_the_environment_and_states_the_license() {
    let bin = env!("CARGO_BIN_EXE_danceba");
    let hub = MockHub::start(Behaviour {
        files: tiny_files(),
        cut_once: Arc::new(Mutex::new(vec![VQVAE_PATH.to_string()])),
        token: Some("hf_cli".into()),
        always_cut: false,
    });
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin)
        .args(["download", "--quiet"])
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_TOKEN", "hf_cli")
        .env("HF_HOME", home.path().join("hf"))
        .env("DANCEBA_CACHE", home.path().join("danceba"))
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(home
        .path()
        .join("danceba/weights/gpt.safetensors")
        .is_file());
    assert!(home
        .path()
        .join("hf/hub/datasets--fancongyi--danceba/snapshots")
        .join(COMMIT)
        .join(VQVAE_PATH)
        .is_file());
    // an --out that is a file is said before anything is fetched
    let blocker = home.path().join("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let before = hub.requests().len();
    let out = std::process::Command::new(bin)
        .args(["download", "--quiet", "--out"])
        .arg(&blocker)
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HOME", home.path().join("hf"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is a file"), "{err}");
    assert_eq!(hub.requests().len(), before);
    // a damaged downloaded file: `generate` says how to mend it
    std::fs::write(home.path().join("danceba/weights/gpt.safetensors"), b"junk").unwrap();
    let song = golden().join("audio/mono22k_mutilated_mime_12s.wav");
    let out = std::process::Command::new(bin)
        .arg("generate")
        .arg(&song)
        .arg("-o")
        .arg(home.path().join("out"))
        .env("HF_HOME", home.path().join("hf"))
        .env("DANCEBA_CACHE", home.path().join("danceba"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("DANCEBA_WEIGHTS")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("danceba download --force"),
        "{err}"
    );
    // `download --help` states the license.
    let help = std::process::Command::new(bin)
        .args(["download", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("S-Lab License") && help.contains("non-commercial"),
        "{help}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
