//! Fault injection on `ptxgrad train`: a small CPU run (64 examples at 65x65, two steps an
//! epoch, an 86 MB checkpoint) killed with SIGKILL or stopped with SIGINT at random moments
//! (mid-save included), on a full filesystem, in a read-only directory, and with two runs on one
//! checkpoint. Each must end with a checkpoint that loads and equals a completed epoch's, or with
//! a clean error that says what is on disk, and leave no temp file or lock behind (a killed
//! run's are cleaned up by the next run on the path).
//!
//! The moments are drawn from a seed printed by each test (`PTXGRAD_FAULT_SEED=N` replays one).
//! The full and read-only filesystems are tmpfs mounts in a private mount namespace
//! (`unshare -rm`), so no privileges are needed beyond what unprivileged user namespaces give.
mod common;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{ptxgrad_command, TempDir};
use ptxgrad::checkpoint::{self, NamedTensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The run every test interrupts: `EPOCHS` epochs of two steps each.
const EPOCHS: usize = 2;

fn train_args(epochs: usize, checkpoint: &Path, extra: &[&str]) -> Vec<String> {
    let base = ["train", "--device", "cpu", "--resize", "65", "--max-examples", "64", "--batch-size", "32"];
    let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    args.extend(["--quiet", "--epochs", &epochs.to_string(), "--checkpoint"].map(String::from));
    args.push(checkpoint.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn spawn_train(epochs: usize, checkpoint: &Path, extra: &[&str]) -> Child {
    let args = train_args(epochs, checkpoint, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ptxgrad_command(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start ptxgrad train")
}

/// Waits for `child`: (exit code, -1 when a signal ended it; stdout; stderr).
fn finish(child: Child) -> (i32, String, String) {
    let out = child.wait_with_output().expect("wait for ptxgrad");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().expect("run kill");
    assert!(ok.success(), "kill -{name} {}", child.id());
}

/// A checkpoint's contents, comparable: the tensors in name order and the metadata.
type Contents = (Vec<NamedTensor>, BTreeMap<String, String>);

fn contents(path: &Path) -> Contents {
    checkpoint::load(path).unwrap_or_else(|e| panic!("{} must load: {e}", path.display()))
}

/// The checkpoint after each epoch 1..=EPOCHS of the uninterrupted run (index 0: epoch 1),
/// made once: training on the CPU is deterministic, and resuming gives what a run that never
/// stopped gives.
fn reference() -> &'static [Contents] {
    static REF: OnceLock<Vec<Contents>> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = TempDir::new("faults-reference");
        let path = dir.join("ref.safetensors");
        (1..=EPOCHS)
            .map(|epoch| {
                let extra: &[&str] = if epoch == 1 { &[] } else { &["--resume"] };
                let (code, _, err) = finish(spawn_train(epoch, &path, extra));
                assert_eq!(code, 0, "reference run to epoch {epoch}: {err}");
                contents(&path)
            })
            .collect()
    })
}

/// The completed epoch `path` holds (0: no file), failing unless it equals that epoch's
/// reference exactly.
fn epoch_on_disk(path: &Path) -> usize {
    if !path.exists() {
        return 0;
    }
    let got = contents(path);
    let epoch: usize = got.1["epoch"].parse().expect("an epoch number");
    assert!((1..=EPOCHS).contains(&epoch), "epoch {epoch} on disk");
    assert!(got == reference()[epoch - 1], "{} differs from the reference after epoch {epoch}", path.display());
    epoch
}

/// The names in `dir` other than `keep`: what a run left behind.
fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect();
    names.sort();
    names
}

fn rng(test: &str) -> StdRng {
    let seed = std::env::var("PTXGRAD_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    eprintln!("{test}: PTXGRAD_FAULT_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

/// Waits until a temp file of `ckpt` holds data (a save is under way: the empty one of the
/// start-up probe does not count) or `child` exits; the temp file's path in the first case.
fn wait_for_save(child: &mut Child, ckpt: &Path, limit: Duration) -> Option<PathBuf> {
    let (dir, name) = (ckpt.parent().unwrap(), ckpt.file_name().unwrap().to_string_lossy().into_owned());
    let start = Instant::now();
    while start.elapsed() < limit {
        let tmp = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).find(|p| {
            let n = p.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned());
            n.starts_with(&name) && n.ends_with(".tmp") && std::fs::metadata(p).is_ok_and(|m| m.len() > 0)
        });
        if tmp.is_some() {
            return tmp;
        }
        if child.try_wait().expect("poll ptxgrad").is_some() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Resumes (or starts) the run on `ckpt` once more and lets it finish: the path is usable after
/// whatever came before, and the result is the uninterrupted run's.
fn complete(ckpt: &Path) {
    if epoch_on_disk(ckpt) == EPOCHS {
        return;
    }
    let extra: &[&str] = if ckpt.exists() { &["--resume"] } else { &[] };
    let (code, _, err) = finish(spawn_train(EPOCHS, ckpt, extra));
    assert_eq!(code, 0, "the run after the faults must complete: {err}");
    assert_eq!(epoch_on_disk(ckpt), EPOCHS);
}

#[test]
fn sigkill_at_random_moments_leaves_a_completed_epoch_and_the_next_run_cleans_up() {
    let mut rng = rng("sigkill");
    reference();
    let dir = TempDir::new("faults-kill");
    let ckpt = dir.join("a.safetensors");
    let mut on_disk = 0;
    // A temp file the last kill left behind: the next run must remove it and say so.
    let mut stale: Option<PathBuf> = None;
    for round in 0..4 {
        let extra: &[&str] = if ckpt.exists() { &["--resume"] } else { &[] };
        if on_disk == EPOCHS {
            break;
        }
        let mut child = spawn_train(EPOCHS, &ckpt, extra);
        if let Some(tmp) = stale.take() {
            let t = Instant::now();
            while tmp.exists() && t.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(!tmp.exists(), "the next run did not remove {}", tmp.display());
        }
        // Odd rounds kill in the middle of a save, even ones at a random moment.
        let mid_save = round % 2 == 1;
        if mid_save {
            let tmp = wait_for_save(&mut child, &ckpt, Duration::from_secs(60));
            eprintln!(
                "round {round}: SIGKILL while {} is written",
                tmp.map_or("nothing".into(), |t| t.display().to_string())
            );
        } else {
            let ms = rng.random_range(200..4000);
            std::thread::sleep(Duration::from_millis(ms));
            eprintln!("round {round}: SIGKILL after {ms} ms");
        }
        signal(&child, "KILL");
        let (code, out, err) = finish(child);
        stale = leftovers(&dir, &[]).into_iter().find(|n| n.ends_with(".tmp")).map(|n| dir.join(&n));
        let now = epoch_on_disk(&ckpt);
        eprintln!("round {round}: exit {code}, epoch {now} on disk");
        assert!(now >= on_disk, "the checkpoint went back from epoch {on_disk} to {now}: {out}{err}");
        on_disk = now;
    }
    // The next run on the path takes over: a stale temp file and lock are no obstacle.
    complete(&ckpt);
    assert_eq!(leftovers(&dir, &["a.safetensors"]), Vec::<String>::new(), "left behind");
}

#[test]
fn sigint_at_random_moments_stops_cleanly_and_says_what_is_on_disk() {
    let mut rng = rng("sigint");
    reference();
    let dir = TempDir::new("faults-int");
    let ckpt = dir.join("b.safetensors");
    for round in 0..3 {
        if epoch_on_disk(&ckpt) == EPOCHS {
            break;
        }
        let before = epoch_on_disk(&ckpt);
        let extra: &[&str] = if ckpt.exists() { &["--resume"] } else { &[] };
        let mut child = spawn_train(EPOCHS, &ckpt, extra);
        if round % 2 == 1 {
            if wait_for_save(&mut child, &ckpt, Duration::from_secs(60)).is_none() {
                continue; // it finished first
            }
        } else {
            std::thread::sleep(Duration::from_millis(rng.random_range(200..4000)));
        }
        signal(&child, "INT");
        let (code, _, err) = finish(child);
        let now = epoch_on_disk(&ckpt);
        eprintln!("round {round}: exit {code}, epoch {before} -> {now}: {err}");
        if code == 0 {
            assert_eq!(now, EPOCHS, "a run that exits 0 has finished");
            continue;
        }
        assert_eq!(code, 130, "SIGINT ends the run with 128 + 2: {err}");
        assert!(err.contains("stopped by SIGINT"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        let shown = ckpt.display().to_string();
        let said = if now == 0 {
            format!("nothing was written to {shown}")
        } else if now == before {
            format!("{shown} is as it was before this run")
        } else {
            format!("{shown} holds epoch {now}")
        };
        assert!(err.contains(&said), "expected `{said}` in: {err}");
        // An interrupted run leaves nothing but the checkpoint: its temp file and lock are gone.
        let keep: &[&str] = if now == 0 { &[] } else { &["b.safetensors"] };
        assert_eq!(leftovers(&dir, keep), Vec::<String>::new(), "left behind after SIGINT");
    }
    complete(&ckpt);
}

#[test]
fn two_runs_on_one_checkpoint_the_second_fails_at_once_naming_the_first() {
    reference();
    let dir = TempDir::new("faults-two");
    let ckpt = dir.join("c.safetensors");
    let mut first = spawn_train(2, &ckpt, &[]);
    let lock = dir.join("c.safetensors.lock");
    let start = Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|s| s.contains(&first.id().to_string())) {
        assert!(start.elapsed() < Duration::from_secs(30), "the first run never took its lock");
        assert!(first.try_wait().unwrap().is_none(), "the first run ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Under the same name, and through a symlink: both are the same file.
    std::os::unix::fs::symlink(&ckpt, dir.join("link.safetensors")).unwrap();
    for path in [ckpt.clone(), dir.join("link.safetensors")] {
        let t = Instant::now();
        let (code, _, err) = finish(spawn_train(1, &path, &["--overwrite"]));
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(&format!("is in use: process {}", first.id())), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10), "refused at once, not after training");
    }
    let (code, _, err) = finish(first);
    assert_eq!(code, 0, "{err}");
    assert_eq!(epoch_on_disk(&ckpt), 2);
    assert_eq!(leftovers(&dir, &["c.safetensors", "link.safetensors"]), Vec::<String>::new());
}

/// Runs `script` under `sh` in a private mount namespace (see the module docs), with `$P` the
/// ptxgrad binary and `$D` an empty tmpfs of `size`; the script copies what the test checks into
/// `$OUT`. Returns (exit code, stdout, stderr) of the script.
fn in_namespace(size: &str, out: &Path, script: &str) -> (i32, String, String) {
    let scratch = TempDir::new(&format!("faults-ns-{size}"));
    let mount = format!("mount -t tmpfs -o size={size} tmpfs \"$D\"");
    let full = format!("set -u; {mount} || exit 99; {script}");
    let binary = common::ptxgrad_binary();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist");
    let run = Command::new("unshare")
        .args(["-rm", "sh", "-c", &full])
        .env("P", binary)
        .env("D", &*scratch)
        .env("OUT", out)
        .env("PTXGRAD_DATA", data)
        .output()
        .expect("run unshare (util-linux)");
    let (code, so, se) = (
        run.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&run.stdout).into_owned(),
        String::from_utf8_lossy(&run.stderr).into_owned(),
    );
    assert_ne!(code, 99, "a tmpfs could not be mounted in a user namespace (`unshare -rm`): {se}");
    (code, so, se)
}

#[test]
fn a_full_filesystem_fails_the_save_and_keeps_the_last_checkpoint() {
    reference();
    let out = TempDir::new("faults-full");
    // Room for one 86 MB checkpoint, not for the next one's temp file beside it.
    let args = train_args(2, Path::new("$D/d.safetensors"), &[]).join(" ");
    let script = format!(
        "\"$P\" {} 2> \"$OUT/stderr\"; echo $? > \"$OUT/code\"; ls -A \"$D\" > \"$OUT/listing\"; \
         cp \"$D/d.safetensors\" \"$OUT/\"",
        args
    );
    let (code, _, se) = in_namespace("130m", &out, &script);
    assert_eq!(code, 0, "{se}");
    let err = std::fs::read_to_string(out.join("stderr")).unwrap();
    assert_eq!(std::fs::read_to_string(out.join("code")).unwrap().trim(), "1", "{err}");
    assert!(err.contains("saving the checkpoint") && err.contains("No space left on device"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Epoch 1's checkpoint is whole, the failed temp file and the lock are gone.
    assert_eq!(std::fs::read_to_string(out.join("listing")).unwrap().trim(), "d.safetensors");
    assert_eq!(epoch_on_disk(&out.join("d.safetensors")), 1);
}

#[test]
fn a_read_only_directory_is_refused_before_training_and_still_evaluates() {
    reference();
    let out = TempDir::new("faults-ro");
    let good = TempDir::new("faults-ro-src");
    let src = good.join("e.safetensors");
    checkpoint::save(&src, &reference()[0].0, &reference()[0].1).unwrap();
    let resume = train_args(2, Path::new("$D/e.safetensors"), &["--resume"]).join(" ");
    let fresh = train_args(1, Path::new("$D/new.safetensors"), &[]).join(" ");
    let script = format!(
        "cp \"$SRC\" \"$D/\" && mount -o remount,ro \"$D\" || exit 98; \
         \"$P\" {resume} 2> \"$OUT/resume\"; echo $? >> \"$OUT/codes\"; \
         \"$P\" {fresh} 2> \"$OUT/fresh\"; echo $? >> \"$OUT/codes\"; \
         \"$P\" eval --device cpu --checkpoint \"$D/e.safetensors\" > \"$OUT/eval\" 2>&1; echo $? >> \"$OUT/codes\"; \
         ls -A \"$D\" > \"$OUT/listing\"; cp \"$D/e.safetensors\" \"$OUT/\""
    );
    let script = format!("export SRC='{}'; {script}", src.display());
    let (code, _, se) = in_namespace("200m", &out, &script);
    assert_eq!(code, 0, "{se}");
    let codes = std::fs::read_to_string(out.join("codes")).unwrap();
    assert_eq!(codes.split_whitespace().collect::<Vec<_>>(), ["1", "1", "0"], "resume, fresh, eval");
    for (file, name) in [("resume", "e.safetensors.lock"), ("fresh", "new.safetensors")] {
        let err = std::fs::read_to_string(out.join(file)).unwrap();
        assert!(err.contains("Read-only file system") && err.contains(name), "{file}: {err}");
        assert!(!err.contains("epoch 1:") && !err.contains("panicked"), "{file}: refused before training: {err}");
    }
    assert!(std::fs::read_to_string(out.join("eval")).unwrap().contains("epoch 1, 65x65, test acc"));
    assert_eq!(std::fs::read_to_string(out.join("listing")).unwrap().trim(), "e.safetensors");
    assert_eq!(epoch_on_disk(&out.join("e.safetensors")), 1);
}
