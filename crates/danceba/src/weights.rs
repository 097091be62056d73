//! Where the DanceBa weights come from: resolution for `generate` (`--weights DIR`, then
//! `$DANCEBA_WEIGHTS`, then our converted cache, then the Hugging Face cache) and `danceba
//! download` (the two official checkpoints from the Hugging Face dataset repo
//! `fancongyi/danceba`, resumable, audited and converted once to safetensors).
//!
//! The checkpoints are under the S-Lab License 1.0 (non-commercial use); this crate never ships
//! them.
//!
//! Environment: `HF_ENDPOINT` (default `https://huggingface.co`), `HF_TOKEN` (or
//! `HUGGING_FACE_HUB_TOKEN`, or the token file `$HF_HOME/token`) sent as `Authorization: Bearer`,
//! `HF_HOME` (default `$XDG_CACHE_HOME/huggingface` or `~/.cache/huggingface`) or `HF_HUB_CACHE`
//! for the hub cache, `DANCEBA_CACHE` (default `$XDG_CACHE_HOME/danceba` or `~/.cache/danceba`)
//! for the converted safetensors, `DANCEBA_WEIGHTS` for a weights directory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::DType;
use danceba_model::arch::ModelKind;
use danceba_model::checkpoint::{convert_checkpoint, ConvertError};

use crate::ModelFiles;

/// The Hugging Face dataset repository holding the official checkpoints.
pub const REPO_ID: &str = "fancongyi/danceba";
/// Folder of the GPT checkpoints (`epoch_*.pt`) in the repository and in the official layout.
pub const GPT_DIR: &str = "experiments/cc_motion_gpt/ckpt";
/// The root VQ-VAE checkpoint in the repository and in the official layout.
pub const VQVAE_PATH: &str = "experiments/sep_vqvae_root/ckpt/epoch_500.pt";
/// File names of a converted weights directory (as written by `danceba convert`).
pub const CONVERTED_GPT: &str = "gpt.safetensors";
pub const CONVERTED_VQVAE: &str = "vqvae.safetensors";
/// The default hub endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The command that fetches the weights, for error messages.
pub const DOWNLOAD_HINT: &str = "run `danceba download` (about 1.3 GB, once), or pass --weights DIR \
     (a directory from `danceba convert`, or the official layout experiments/cc_motion_gpt/ckpt/epoch_*.pt + \
     experiments/sep_vqvae_root/ckpt/epoch_500.pt), or set DANCEBA_WEIGHTS=DIR";

/// Errors of weights resolution and download.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(
        "no DanceBa weights found (looked in: {}); {DOWNLOAD_HINT}",
        list(searched)
    )]
    NotFound { searched: Vec<PathBuf> },
    #[error(
        "{} does not hold DanceBa weights: expected {CONVERTED_GPT} + {CONVERTED_VQVAE} (from `danceba convert`) \
         or the official layout {GPT_DIR}/epoch_*.pt + {VQVAE_PATH}{}",
        dir.display(), hint.as_deref().map(|h| format!(" ({h})")).unwrap_or_default()
    )]
    NotAWeightsDir { dir: PathBuf, hint: Option<String> },
    #[error("{url}: access denied (HTTP {status}); if the repository needs a login, set HF_TOKEN to a Hugging Face access token")]
    Unauthorized { url: String, status: u16 },
    #[error("{url}: HTTP {status}{}", detail_suffix(detail))]
    Http {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{url}: {msg} (check your network connection, or HF_ENDPOINT)")]
    Network { url: String, msg: String },
    #[error("the repository listing of {url} is not what the hub returns: {msg}")]
    BadListing { url: String, msg: String },
    #[error(
        "no GPT checkpoint (epoch_*.pt) in {url}; pass --gpt-file NAME if it has another name"
    )]
    NoGptCheckpoint { url: String },
    #[error("{}: downloaded {got} bytes, expected {expected}", path.display())]
    SizeMismatch {
        path: PathBuf,
        got: u64,
        expected: u64,
    },
    #[error("{}: SHA-256 {got} does not match the hub's {expected}; the partial file was removed, run `danceba download` again", path.display())]
    HashMismatch {
        path: PathBuf,
        got: String,
        expected: String,
    },
    #[error("{url}: gave up after {attempts} interrupted attempts ({msg}); run `danceba download` again to resume")]
    Interrupted {
        url: String,
        attempts: u32,
        msg: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checking/converting the downloaded checkpoint failed: {0}")]
    Convert(Box<ConvertError>),
    #[error("{}: not a valid {kind} checkpoint: {msg}", path.display())]
    Audit {
        path: PathBuf,
        kind: ModelKind,
        msg: String,
    },
    #[error("cannot find a cache directory: set HF_HOME and DANCEBA_CACHE (or HOME)")]
    NoHome,
}

impl From<ConvertError> for WeightsError {
    fn from(e: ConvertError) -> Self {
        WeightsError::Convert(Box::new(e))
    }
}

fn list(p: &[PathBuf]) -> String {
    p.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn detail_suffix(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!(": {d}")
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn xdg_cache() -> Option<PathBuf> {
    env_path("XDG_CACHE_HOME").or_else(|| env_path("HOME").map(|h| h.join(".cache")))
}

/// Where our converted safetensors live: `$DANCEBA_CACHE/weights` (default
/// `$XDG_CACHE_HOME/danceba/weights` or `~/.cache/danceba/weights`).
pub fn converted_cache_dir() -> Option<PathBuf> {
    env_path("DANCEBA_CACHE")
        .or_else(|| xdg_cache().map(|c| c.join("danceba")))
        .map(|d| d.join("weights"))
}

/// Whether `path` lies in a cache that `danceba download` fills (the converted weights or the
/// hub cache's copy of the repository): a damaged file there is mended by `download --force`.
pub fn is_downloaded(path: &Path) -> bool {
    converted_cache_dir().is_some_and(|d| path.starts_with(d))
        || HubConfig::from_env().is_ok_and(|c| path.starts_with(c.repo_cache()))
}

/// Where and how to reach the hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubConfig {
    /// e.g. `https://huggingface.co` (no trailing slash).
    pub endpoint: String,
    pub token: Option<String>,
    /// The hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`).
    pub hub_cache: PathBuf,
    pub repo_id: String,
    pub revision: String,
}

impl HubConfig {
    /// From `HF_ENDPOINT`, `HF_TOKEN`/`HUGGING_FACE_HUB_TOKEN`/`$HF_HOME/token`, `HF_HOME`,
    /// `HF_HUB_CACHE`; repository [`REPO_ID`] at revision `main`.
    pub fn from_env() -> Result<Self, WeightsError> {
        let hf_home = env_path("HF_HOME")
            .or_else(|| xdg_cache().map(|c| c.join("huggingface")))
            .ok_or(WeightsError::NoHome)?;
        let hub_cache = env_path("HF_HUB_CACHE").unwrap_or_else(|| hf_home.join("hub"));
        let token = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
            .iter()
            .find_map(|k| std::env::var(k).ok())
            .or_else(|| std::fs::read_to_string(hf_home.join("token")).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Ok(Self {
            endpoint: endpoint.trim().trim_end_matches('/').to_string(),
            token,
            hub_cache,
            repo_id: REPO_ID.to_string(),
            revision: "main".to_string(),
        })
    }

    /// `<hub cache>/datasets--owner--name`.
    pub fn repo_cache(&self) -> PathBuf {
        self.hub_cache
            .join(format!("datasets--{}", self.repo_id.replace('/', "--")))
    }

    fn resolve_url(&self, path: &str) -> String {
        format!(
            "{}/datasets/{}/resolve/{}/{}",
            self.endpoint, self.repo_id, self.revision, path
        )
    }

    fn tree_url(&self, dir: &str) -> String {
        format!(
            "{}/api/datasets/{}/tree/{}/{}",
            self.endpoint, self.repo_id, self.revision, dir
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Resolution

/// The GPT checkpoint to use among `epoch_*.pt` names: the official config's `epoch_0.pt` if
/// present, else the highest epoch.
pub fn pick_gpt_name<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(u64, &str)> = None;
    for n in names {
        let Some(e) = n
            .strip_prefix("epoch_")
            .and_then(|r| r.strip_suffix(".pt"))
            .and_then(|d| d.parse::<u64>().ok())
        else {
            continue;
        };
        if e == 0 {
            return Some(n);
        }
        if best.is_none_or(|(b, _)| e > b) {
            best = Some((e, n));
        }
    }
    best.map(|(_, n)| n)
}

/// The model files in `dir`: a converted directory (`gpt.safetensors` + `vqvae.safetensors`) or
/// the official layout (`dir` being the repository root, or `dir/experiments` existing).
pub fn from_dir(dir: &Path) -> Result<ModelFiles, WeightsError> {
    if !dir.is_dir() {
        return Err(WeightsError::NotAWeightsDir {
            dir: dir.to_path_buf(),
            hint: Some(if dir.exists() {
                "it is a file, not a directory; use --gpt FILE --vqvae FILE for single files".into()
            } else {
                "it does not exist".into()
            }),
        });
    }
    let (g, v) = (dir.join(CONVERTED_GPT), dir.join(CONVERTED_VQVAE));
    if g.is_file() && v.is_file() {
        return Ok(ModelFiles::new(g, v));
    }
    let vq = dir.join(VQVAE_PATH);
    let names: Vec<String> = std::fs::read_dir(dir.join(GPT_DIR))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let gpt = pick_gpt_name(names.iter().map(String::as_str)).map(|n| dir.join(GPT_DIR).join(n));
    match (gpt, vq.is_file()) {
        (Some(g), true) => Ok(ModelFiles::new(g, vq)),
        (gpt, vq_ok) => {
            let mut missing = Vec::new();
            if gpt.is_none() && !g.is_file() {
                missing.push(format!("no {GPT_DIR}/epoch_*.pt or {CONVERTED_GPT}"));
            }
            if !vq_ok && !v.is_file() {
                missing.push(format!("no {VQVAE_PATH} or {CONVERTED_VQVAE}"));
            }
            Err(WeightsError::NotAWeightsDir {
                dir: dir.to_path_buf(),
                hint: (!missing.is_empty()).then(|| missing.join("; ")),
            })
        }
    }
}

/// The official layout in the hub cache: the snapshot `refs/main` points at, else the most
/// recently modified complete snapshot.
pub fn from_hub_cache(cfg: &HubConfig) -> Option<ModelFiles> {
    let repo = cfg.repo_cache();
    let snaps = repo.join("snapshots");
    if let Ok(commit) = std::fs::read_to_string(repo.join("refs").join(&cfg.revision)) {
        if let Ok(f) = from_dir(&snaps.join(commit.trim())) {
            return Some(f);
        }
    }
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snaps)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let m = e.metadata().ok()?.modified().ok()?;
            Some((m, e.path()))
        })
        .collect();
    dirs.sort();
    dirs.iter().rev().find_map(|(_, d)| from_dir(d).ok())
}

/// Resolves the weights for `generate`: `--weights DIR`, else `$DANCEBA_WEIGHTS`, else our
/// converted cache ([`converted_cache_dir`]), else the Hugging Face cache; if none holds them,
/// an error that says what to run.
pub fn resolve(weights: Option<&Path>) -> Result<ModelFiles, WeightsError> {
    if let Some(d) = weights {
        return from_dir(d);
    }
    if let Some(d) = env_path("DANCEBA_WEIGHTS") {
        return from_dir(&d).map_err(|e| match e {
            WeightsError::NotAWeightsDir { dir, hint } => WeightsError::NotAWeightsDir {
                dir,
                hint: Some(format!(
                    "set by DANCEBA_WEIGHTS{}",
                    hint.map(|h| format!("; {h}")).unwrap_or_default()
                )),
            },
            e => e,
        });
    }
    let mut searched = Vec::new();
    if let Some(c) = converted_cache_dir() {
        if let Ok(f) = from_dir(&c) {
            return Ok(f);
        }
        searched.push(c);
    }
    if let Ok(cfg) = HubConfig::from_env() {
        if let Some(f) = from_hub_cache(&cfg) {
            return Ok(f);
        }
        searched.push(cfg.repo_cache());
    }
    Err(WeightsError::NotFound { searched })
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// A file of the repository listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    /// Path in the repository.
    pub path: String,
    pub size: Option<u64>,
    /// SHA-256 of the content (the LFS object id), when the hub gives it.
    pub sha256: Option<String>,
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .redirects(0)
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(120))
        .user_agent(concat!("danceba/", env!("CARGO_PKG_VERSION")))
        .build()
}

fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or("")
}

/// Joins a redirect `Location` to the URL it came from.
fn join_url(base: &str, loc: &str) -> String {
    if loc.contains("://") {
        return loc.to_string();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if let Some(p) = loc.strip_prefix("//") {
        return format!("{scheme}://{p}");
    }
    if loc.starts_with('/') {
        return format!("{scheme}://{host}{loc}");
    }
    let path = &rest[host.len()..];
    let path = path.split(['?', '#']).next().unwrap_or("");
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    format!("{scheme}://{host}{dir}/{loc}")
}

/// ureq's message for a failed request without the URL it starts with ("URL: Dns Failed: …"),
/// which [`WeightsError::Network`] names already.
fn network_message(url: &str, msg: &str) -> String {
    msg.strip_prefix(url)
        .and_then(|m| m.strip_prefix(": "))
        .unwrap_or(msg)
        .to_string()
}

/// A response, the URL it came from, and the `X-Repo-Commit` seen along the redirects.
type Got = (ureq::Response, String, Option<String>);

/// GET `url` following up to 10 redirects by hand: the `Authorization` header is only sent to
/// the host of the original URL; `range_from` is kept across redirects.
fn get(cfg: &HubConfig, url: &str, range_from: Option<u64>) -> Result<Got, WeightsError> {
    let agent = agent();
    let origin = host_of(url).to_string();
    let mut cur = url.to_string();
    let mut commit = None;
    for _ in 0..10 {
        let mut req = agent.get(&cur);
        if let (Some(t), true) = (&cfg.token, host_of(&cur) == origin) {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        if let Some(off) = range_from.filter(|&o| o > 0) {
            req = req.set("Range", &format!("bytes={off}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(status, r)) => {
                if status == 401 || status == 403 {
                    return Err(WeightsError::Unauthorized { url: cur, status });
                }
                if status == 416 {
                    return Ok((r, cur, commit));
                }
                let detail = r
                    .header("X-Error-Message")
                    .map(str::to_string)
                    .unwrap_or_default();
                return Err(WeightsError::Http {
                    url: cur,
                    status,
                    detail,
                });
            }
            Err(e) => {
                let msg = network_message(&cur, &e.to_string());
                return Err(WeightsError::Network { url: cur, msg });
            }
        };
        if let Some(c) = resp.header("X-Repo-Commit") {
            commit = Some(c.trim().to_string());
        }
        if (300..400).contains(&resp.status()) {
            let Some(loc) = resp.header("Location") else {
                return Err(WeightsError::Http {
                    url: cur,
                    status: resp.status(),
                    detail: "redirect without a Location".into(),
                });
            };
            cur = join_url(&cur, loc);
            continue;
        }
        return Ok((resp, cur, commit));
    }
    Err(WeightsError::Http {
        url: url.to_string(),
        status: 310,
        detail: "too many redirects".into(),
    })
}

/// Lists the files of directory `dir` of the repository (the hub's tree API).
pub fn list_dir(cfg: &HubConfig, dir: &str) -> Result<Vec<RemoteFile>, WeightsError> {
    let url = cfg.tree_url(dir);
    let (resp, _, _) = get(cfg, &url, None)?;
    let bad = |msg: String| WeightsError::BadListing {
        url: url.clone(),
        msg,
    };
    let text = resp
        .into_string()
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let arr = v.as_array().ok_or_else(|| bad("not a JSON array".into()))?;
    Ok(arr
        .iter()
        .filter(|e| e.get("type").and_then(|t| t.as_str()) == Some("file"))
        .filter_map(|e| {
            let path = e.get("path")?.as_str()?.to_string();
            let lfs = e.get("lfs");
            let size = lfs
                .and_then(|l| l.get("size"))
                .or_else(|| e.get("size"))
                .and_then(|s| s.as_u64());
            let sha256 = lfs
                .and_then(|l| l.get("oid").or_else(|| l.get("sha256")))
                .and_then(|s| s.as_str())
                .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_ascii_lowercase);
            Some(RemoteFile { path, size, sha256 })
        })
        .collect())
}

/// Progress of one file: `(path in repo, bytes done, total bytes if known)`.
pub type ProgressFn<'a> = &'a mut dyn FnMut(&str, u64, Option<u64>);

fn sha256_of(path: &Path) -> Result<String, WeightsError> {
    use danceba_model::checkpoint::CheckpointError;
    danceba_model::checkpoint::sha256_file(path).map_err(|e| match e {
        CheckpointError::Io { path, source } => WeightsError::Io { path, source },
        other => ConvertError::from(other).into(),
    })
}

fn header_u64(r: &ureq::Response, name: &str) -> Option<u64> {
    r.header(name).and_then(|v| v.trim().parse().ok())
}

/// Total size from `Content-Range: bytes a-b/total`.
fn content_range_total(r: &ureq::Response) -> Option<(u64, Option<u64>)> {
    let v = r
        .header("Content-Range")?
        .trim()
        .strip_prefix("bytes")?
        .trim();
    let (range, total) = v.split_once('/')?;
    let start = range.split('-').next()?.trim().parse().ok()?;
    Some((start, total.trim().parse().ok()))
}

/// Downloads `file` of the repository to `dest`, resuming from `dest.part` (HTTP Range) after an
/// interruption, in this run (up to 5 retries) or a later one. Checks the size and, when the hub
/// gives it, the SHA-256. Returns the repository commit (`X-Repo-Commit`) if the hub sent one.
pub fn download_file(
    cfg: &HubConfig,
    file: &RemoteFile,
    dest: &Path,
    progress: ProgressFn<'_>,
) -> Result<Option<String>, WeightsError> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let part = PathBuf::from(format!("{}.part", dest.display()));
    let url = cfg.resolve_url(&file.path);
    let mut commit = None;
    let mut attempts = 0u32;
    let mut expected = file.size;
    loop {
        let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if expected.is_some_and(|e| have > e) {
            std::fs::remove_file(&part).map_err(io_err(&part))?;
            continue;
        }
        let result = (|| -> Result<(), AttemptError> {
            if expected == Some(have) && have > 0 {
                return Ok(()); // already complete
            }
            let (resp, final_url, c) = get(cfg, &url, Some(have)).map_err(AttemptError::Fatal)?;
            if c.is_some() {
                commit = c;
            }
            let status = resp.status();
            let (mut out, start) = match status {
                206 => {
                    let (start, total) = content_range_total(&resp).unwrap_or((have, None));
                    if start != have {
                        return Err(AttemptError::Fatal(WeightsError::Http {
                            url: final_url,
                            status,
                            detail: format!("asked for bytes from {have}, got from {start}"),
                        }));
                    }
                    if let Some(t) = total {
                        expected = Some(t);
                    }
                    let f = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&part)
                        .map_err(|e| AttemptError::Fatal(io_err(&part)(e)))?;
                    (f, have)
                }
                200 => {
                    if let Some(len) = header_u64(&resp, "Content-Length") {
                        expected = Some(len);
                    }
                    let f = std::fs::File::create(&part)
                        .map_err(|e| AttemptError::Fatal(io_err(&part)(e)))?;
                    (f, 0)
                }
                416 if have > 0 => {
                    // Nothing left to send: the part file is complete (checked below).
                    expected = expected.or(Some(have));
                    return Ok(());
                }
                _ => {
                    return Err(AttemptError::Fatal(WeightsError::Http {
                        url: final_url,
                        status,
                        detail: "unexpected status".into(),
                    }))
                }
            };
            let mut reader = resp.into_reader();
            let mut buf = vec![0u8; 1 << 16];
            let mut done = start;
            progress(&file.path, done, expected);
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = out.flush();
                        return Err(AttemptError::Retry(e.to_string()));
                    }
                };
                out.write_all(&buf[..n])
                    .map_err(|e| AttemptError::Fatal(io_err(&part)(e)))?;
                done += n as u64;
                progress(&file.path, done, expected);
            }
            out.sync_all()
                .map_err(|e| AttemptError::Fatal(io_err(&part)(e)))?;
            if expected.is_some_and(|e| done < e) {
                return Err(AttemptError::Retry(format!(
                    "connection closed after {done} of {} bytes",
                    expected.unwrap_or(0)
                )));
            }
            Ok(())
        })();
        match result {
            Ok(()) => break,
            Err(AttemptError::Fatal(e)) => return Err(e),
            Err(AttemptError::Retry(msg)) => {
                attempts += 1;
                if attempts > 5 {
                    return Err(WeightsError::Interrupted { url, attempts, msg });
                }
                std::thread::sleep(Duration::from_millis(200 * u64::from(attempts)));
            }
        }
    }
    let got = std::fs::metadata(&part).map_err(io_err(&part))?.len();
    if let Some(e) = expected {
        if got != e {
            let _ = std::fs::remove_file(&part);
            return Err(WeightsError::SizeMismatch {
                path: dest.to_path_buf(),
                got,
                expected: e,
            });
        }
    }
    if let Some(want) = &file.sha256 {
        let have = sha256_of(&part)?;
        if &have != want {
            let _ = std::fs::remove_file(&part);
            return Err(WeightsError::HashMismatch {
                path: dest.to_path_buf(),
                got: have,
                expected: want.clone(),
            });
        }
    }
    std::fs::rename(&part, dest).map_err(io_err(dest))?;
    Ok(commit)
}

enum AttemptError {
    Retry(String),
    Fatal(WeightsError),
}

// ---------------------------------------------------------------------------------------------
// download + convert

/// Options of [`download`].
#[derive(Clone, Debug, Default)]
pub struct DownloadOptions {
    /// Download again and reconvert even if present.
    pub force: bool,
    /// Use this GPT checkpoint name (in [`GPT_DIR`]) instead of choosing from the listing.
    pub gpt_file: Option<String>,
    /// Skip the conversion to safetensors (the `.pt` files are still used by `generate`).
    pub no_convert: bool,
    /// Where to write the converted safetensors (default [`converted_cache_dir`]).
    pub converted_dir: Option<PathBuf>,
}

/// What [`download`] did.
#[derive(Clone, Debug)]
pub struct DownloadReport {
    /// The downloaded official checkpoints (in the hub cache).
    pub official: ModelFiles,
    /// The converted safetensors, unless `no_convert`.
    pub converted: Option<ModelFiles>,
    /// Repository commit of the snapshot.
    pub commit: String,
    /// Files that were already present and not fetched again.
    pub reused: Vec<PathBuf>,
}

/// Fetches the GPT and VQ-VAE checkpoints into the hub cache
/// (`<hub cache>/datasets--fancongyi--danceba/snapshots/<commit>/…`, with `refs/<revision>`),
/// then audits and converts them once into `gpt.safetensors` + `vqvae.safetensors` (f32).
pub fn download(
    cfg: &HubConfig,
    opts: &DownloadOptions,
    progress: ProgressFn<'_>,
) -> Result<DownloadReport, WeightsError> {
    let listing = list_dir(cfg, GPT_DIR)?;
    let gpt_remote = match &opts.gpt_file {
        Some(name) => {
            let path = format!("{GPT_DIR}/{name}");
            listing
                .iter()
                .find(|f| f.path == path)
                .cloned()
                .unwrap_or(RemoteFile {
                    path,
                    size: None,
                    sha256: None,
                })
        }
        None => {
            let names: Vec<&str> = listing
                .iter()
                .filter_map(|f| f.path.rsplit('/').next())
                .collect();
            let name = pick_gpt_name(names.iter().copied()).ok_or_else(|| {
                WeightsError::NoGptCheckpoint {
                    url: cfg.tree_url(GPT_DIR),
                }
            })?;
            listing
                .iter()
                .find(|f| f.path.rsplit('/').next() == Some(name))
                .cloned()
                .ok_or_else(|| WeightsError::NoGptCheckpoint {
                    url: cfg.tree_url(GPT_DIR),
                })?
        }
    };
    let vq_dir = VQVAE_PATH.rsplit_once('/').map_or("", |(d, _)| d);
    let vq_remote = list_dir(cfg, vq_dir)
        .ok()
        .and_then(|l| l.into_iter().find(|f| f.path == VQVAE_PATH))
        .unwrap_or(RemoteFile {
            path: VQVAE_PATH.to_string(),
            size: None,
            sha256: None,
        });

    let repo = cfg.repo_cache();
    // Download into a staging snapshot named after the revision; renamed to the commit after.
    let rev_ref = repo.join("refs").join(&cfg.revision);
    let known_commit = std::fs::read_to_string(&rev_ref)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.contains(['/', '\\', '.']));
    let mut snapshot = repo
        .join("snapshots")
        .join(known_commit.as_deref().unwrap_or(&cfg.revision));
    let mut commit = known_commit.clone();
    let mut reused = Vec::new();
    for remote in [&gpt_remote, &vq_remote] {
        let dest = snapshot.join(&remote.path);
        // a file already there is kept if its size and (where the hub gives it) its SHA-256
        // are the hub's; a damaged one is fetched again
        if dest.is_file()
            && !opts.force
            && remote
                .size
                .is_none_or(|s| dest.metadata().is_ok_and(|m| m.len() == s))
            && match &remote.sha256 {
                Some(want) => sha256_of(&dest)?.eq_ignore_ascii_case(want),
                None => true,
            }
        {
            reused.push(dest);
            continue;
        }
        if let Some(c) = download_file(cfg, remote, &dest, progress)? {
            let c_ok = !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric());
            if c_ok && commit.as_deref() != Some(&c) {
                // Move what we have into the commit's snapshot directory.
                let target = repo.join("snapshots").join(&c);
                if snapshot != target {
                    move_tree(&snapshot, &target)?;
                    snapshot = target;
                }
                commit = Some(c);
            }
        }
    }
    let commit = commit.unwrap_or_else(|| cfg.revision.clone());
    if let Some(p) = rev_ref.parent() {
        std::fs::create_dir_all(p).map_err(io_err(p))?;
    }
    std::fs::write(&rev_ref, &commit).map_err(io_err(&rev_ref))?;
    let official = ModelFiles::new(snapshot.join(&gpt_remote.path), snapshot.join(VQVAE_PATH));

    let converted = if opts.no_convert {
        audit(&official.gpt, ModelKind::Gpt)?;
        audit(&official.vqvae, ModelKind::Vqvae)?;
        None
    } else {
        let dir = match &opts.converted_dir {
            Some(d) => d.clone(),
            None => converted_cache_dir().ok_or(WeightsError::NoHome)?,
        };
        // both files' SHA-256 are the hub's where it gives them: kept files were checked
        // against it, fetched ones by `download_file`
        Some(convert_into(
            &official,
            &dir,
            opts.force || reused.len() < 2,
            [gpt_remote.sha256.as_deref(), vq_remote.sha256.as_deref()],
        )?)
    };
    Ok(DownloadReport {
        official,
        converted,
        commit,
        reused,
    })
}

/// Loads `path` and checks that it is a complete `kind` checkpoint (every needed key present with
/// the right shape), without converting it.
pub fn audit(path: &Path, kind: ModelKind) -> Result<(), WeightsError> {
    let err = |msg: String| WeightsError::Audit {
        path: path.to_path_buf(),
        kind,
        msg,
    };
    let sd = danceba_model::checkpoint::load(path).map_err(|e| err(e.to_string()))?;
    let (found, arch, audit) =
        danceba_model::arch::inspect_state_dict(&sd, None).map_err(|e| err(e.to_string()))?;
    if found != kind || arch.is_none() {
        return Err(err(format!("it is a {found} checkpoint")));
    }
    audit.into_result().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Audits the two official checkpoints and converts them into `dir` (`gpt.safetensors`,
/// `vqvae.safetensors`, f32), replacing older conversions when `replace`. Otherwise an existing
/// file is kept only if it is this checkpoint's conversion (its metadata names the kind and the
/// source's SHA-256, see [`is_conversion_of`]); anything else there is converted over.
/// `known_sha256` holds the two sources' SHA-256 (GPT, VQ-VAE) where the caller knows them.
pub fn convert_into(
    official: &ModelFiles,
    dir: &Path,
    replace: bool,
    known_sha256: [Option<&str>; 2],
) -> Result<ModelFiles, WeightsError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let out = ModelFiles::new(dir.join(CONVERTED_GPT), dir.join(CONVERTED_VQVAE));
    for ((src, dst, kind), sha) in [
        (&official.gpt, &out.gpt, ModelKind::Gpt),
        (&official.vqvae, &out.vqvae, ModelKind::Vqvae),
    ]
    .into_iter()
    .zip(known_sha256)
    {
        if !replace && is_conversion_of(dst, src, kind, sha)? {
            continue;
        }
        convert_checkpoint(src, dst, Some(kind), DType::F32, None, true)?;
    }
    Ok(out)
}

/// Whether `converted` is a safetensors file that [`convert_checkpoint`] wrote from `source`
/// as a `kind` checkpoint: its metadata's `kind` and `source_sha256`, compared with
/// `source_sha256` if the caller knows it, else with a hash of `source` (about 2 s per GB). A
/// missing or unreadable file, or one from another source, is not.
pub fn is_conversion_of(
    converted: &Path,
    source: &Path,
    kind: ModelKind,
    source_sha256: Option<&str>,
) -> Result<bool, WeightsError> {
    let Some(meta) = safetensors_metadata(converted) else {
        return Ok(false);
    };
    let field = |k: &str| meta.get(k).and_then(|v| v.as_str()).map(str::to_string);
    if field("kind") != Some(kind.to_string()) {
        return Ok(false);
    }
    let Some(recorded) = field("source_sha256") else {
        return Ok(false);
    };
    Ok(match source_sha256 {
        Some(sha) => sha.eq_ignore_ascii_case(&recorded),
        None => sha256_of(source)?.eq_ignore_ascii_case(&recorded),
    })
}

/// The `__metadata__` object of a safetensors file's header, if it is one.
fn safetensors_metadata(path: &Path) -> Option<serde_json::Map<String, serde_json::Value>> {
    safetensors_header(path)?
        .get("__metadata__")?
        .as_object()
        .cloned()
}

/// The half-precision type (`"f16"`, `"bf16"`) a safetensors checkpoint stores its weights in,
/// from its header; `None` for full precision, or for a file that is not safetensors (the
/// official `.pt` files are f32).
pub fn stored_half_dtype(path: &Path) -> Option<&'static str> {
    let header = safetensors_header(path)?;
    let dtypes: Vec<&str> = header
        .as_object()?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, v)| v.get("dtype")?.as_str())
        .collect();
    if dtypes.contains(&"BF16") {
        Some("bf16")
    } else if dtypes.contains(&"F16") {
        Some("f16")
    } else {
        None
    }
}

/// A safetensors file's JSON header, if it is one.
fn safetensors_header(path: &Path) -> Option<serde_json::Value> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    // the format caps the header at 100 MB
    if len == 0 || len > 100_000_000 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).ok()?;
    serde_json::from_slice(&header).ok()
}

fn move_tree(from: &Path, to: &Path) -> Result<(), WeightsError> {
    if !from.exists() {
        return Ok(());
    }
    if !to.exists() {
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p).map_err(io_err(p))?;
        }
        return std::fs::rename(from, to).map_err(io_err(to));
    }
    for e in std::fs::read_dir(from).map_err(io_err(from))? {
        let e = e.map_err(io_err(from))?;
        let t = to.join(e.file_name());
        if e.path().is_dir() {
            move_tree(&e.path(), &t)?;
        } else if !t.exists() {
            std::fs::rename(e.path(), &t).map_err(io_err(&t))?;
        }
    }
    let _ = std::fs::remove_dir_all(from);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt_checkpoint_choice_prefers_the_official_epoch_0() {
        assert_eq!(
            pick_gpt_name(["epoch_300.pt", "epoch_0.pt", "x.pt"]),
            Some("epoch_0.pt")
        );
        assert_eq!(
            pick_gpt_name(["epoch_20.pt", "epoch_300.pt", "epoch_x.pt"]),
            Some("epoch_300.pt")
        );
        assert_eq!(pick_gpt_name(["model.pt", "epoch_.pt"]), None);
    }

    #[test]
    fn redirect_locations_join_like_a_browser() {
        let b = "https://huggingface.co/datasets/a/b/resolve/main/x/y.pt";
        assert_eq!(
            join_url(b, "https://cdn.example/z"),
            "https://cdn.example/z"
        );
        assert_eq!(join_url(b, "/api/x"), "https://huggingface.co/api/x");
        assert_eq!(join_url(b, "//cdn.example/z"), "https://cdn.example/z");
        assert_eq!(
            join_url(b, "z.pt?s=1"),
            "https://huggingface.co/datasets/a/b/resolve/main/x/z.pt?s=1"
        );
        assert_eq!(host_of("http://127.0.0.1:8080/a?b"), "127.0.0.1:8080");
    }

    #[test]
    fn missing_weights_name_the_download_command() {
        let e = WeightsError::NotFound {
            searched: vec![PathBuf::from("/x/danceba/weights")],
        }
        .to_string();
        assert!(
            e.contains("danceba download") && e.contains("/x/danceba/weights"),
            "{e}"
        );
    }

    #[test]
    fn a_directory_without_weights_is_explained() {
        let d = tempfile::tempdir().unwrap();
        let e = from_dir(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("gpt.safetensors") && e.contains(VQVAE_PATH),
            "{e}"
        );
        let e = from_dir(&d.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        // The official layout is found, with the official epoch chosen.
        let g = d.path().join(GPT_DIR);
        std::fs::create_dir_all(&g).unwrap();
        std::fs::write(g.join("epoch_0.pt"), b"x").unwrap();
        std::fs::write(g.join("epoch_300.pt"), b"x").unwrap();
        let v = d.path().join(VQVAE_PATH);
        std::fs::create_dir_all(v.parent().unwrap()).unwrap();
        std::fs::write(&v, b"x").unwrap();
        let f = from_dir(d.path()).unwrap();
        assert_eq!(f.gpt, g.join("epoch_0.pt"));
        assert_eq!(f.vqvae, v);
        // A converted directory wins.
        std::fs::write(d.path().join(CONVERTED_GPT), b"x").unwrap();
        std::fs::write(d.path().join(CONVERTED_VQVAE), b"x").unwrap();
        assert_eq!(
            from_dir(d.path()).unwrap().gpt,
            d.path().join(CONVERTED_GPT)
        );
    }
}
