//! One cache filled by many processes (`cache --shard I/N`, Slurm job
//! arrays, Kubernetes Indexed Jobs) through the real binary: 4 shards at once
//! on one directory, one killed and rerun, end with the entries of a
//! single-process fill, byte for byte; the scheduler environments (the Slurm
//! example script itself) choose the shards `--shard` does; the example
//! manifests parse and agree with themselves.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use freezesplit::cache::image_key;
use freezesplit::cache::shard::{self, SHARD_COUNT_VAR, Shard};

const N_IMAGES: usize = 40;
const SCHEDULER_VARS: [&str; 6] = ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_STEP", "JOB_COMPLETION_INDEX", SHARD_COUNT_VAR];

fn model() -> PathBuf {
    common::root().join("models/tiny-256-nc3-stripped.onnx")
}

/// The cache command with no scheduler variables from the test's own
/// environment (the tests may themselves run inside a Slurm job).
fn cache_cmd(yaml: &Path, cache_dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(common::bin());
    c.args(["cache", "--engine", "tract", "--threads", "1", "--split", "train", "--batch-size", "2", "--weights"])
        .arg(model())
        .arg("--data")
        .arg(yaml)
        .arg("--cache-dir")
        .arg(cache_dir)
        .args(extra);
    for v in SCHEDULER_VARS {
        c.env_remove(v);
    }
    c
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "cache failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// (computed, cached, images) of the train split.
fn counts(v: &serde_json::Value) -> (u64, u64, u64) {
    let t = &v["splits"]["train"];
    (t["computed"].as_u64().unwrap(), t["cached"].as_u64().unwrap(), t["images"].as_u64().unwrap())
}

/// Every entry file under a cache root, by path relative to it, with its bytes.
fn entries(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.extension().is_some_and(|x| x == "feat") {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The image keys that shard `i` of `n` should hold, by the library's rule.
fn expected_keys(yaml: &Path, i: usize, n: usize) -> BTreeSet<String> {
    let data = freezesplit::data::Dataset::load(yaml).unwrap();
    let mine = shard::select(&data.images("train").unwrap(), &data.root, Shard { index: i, count: n });
    mine.iter().map(|p| image_key(&std::fs::read(p).unwrap())).collect()
}

fn keys_of(e: &BTreeMap<PathBuf, Vec<u8>>) -> BTreeSet<String> {
    e.keys().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect()
}

fn dataset(dir: &Path) -> PathBuf {
    freezesplit::demo::synth::colour_dataset(&dir.join("data"), N_IMAGES, 0, 7).unwrap()
}

#[test]
fn four_shards_at_once_one_killed_and_rerun_equal_a_single_process_fill() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path());
    let (single, sharded) = (dir.path().join("single"), dir.path().join("sharded"));
    assert_eq!(counts(&json(&cache_cmd(&yaml, &single, &["--json"]).output().unwrap())), (N_IMAGES as u64, 0, N_IMAGES as u64));
    let want = entries(&single);
    assert_eq!(want.len(), N_IMAGES);

    // shard 3 is killed (SIGKILL) as soon as the first of its entries is in place
    let victim: BTreeSet<String> = expected_keys(&yaml, 3, 4);
    assert!(!victim.is_empty());
    let spawn = |i: usize| cache_cmd(&yaml, &sharded, &["--json", "--shard", &format!("{i}/4")]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let others: Vec<_> = [1, 2, 4].map(|i| (i, spawn(i))).into_iter().collect();
    let mut killed = spawn(3);
    let start = Instant::now();
    let mut had = 0;
    while start.elapsed() < Duration::from_secs(60) {
        had = keys_of(&entries(&sharded)).intersection(&victim).count();
        if had > 0 || killed.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    killed.kill().ok();
    killed.wait().unwrap();
    if had >= victim.len() {
        eprintln!("note: shard 3 had finished before it was killed; the rerun below computes nothing");
    }
    for (i, child) in others {
        let v = json(&child.wait_with_output().unwrap());
        assert_eq!(v["shard"]["index"], i);
        assert_eq!(v["shard"]["from"], "--shard");
        let (computed, cached, images) = counts(&v);
        assert_eq!((computed + cached, images), (expected_keys(&yaml, i, 4).len() as u64, expected_keys(&yaml, i, 4).len() as u64));
    }
    let rerun = json(&cache_cmd(&yaml, &sharded, &["--json", "--shard", "3/4"]).output().unwrap());
    let (computed, cached, _) = counts(&rerun);
    assert_eq!(computed + cached, victim.len() as u64);
    assert!(cached as usize >= had.min(victim.len()), "entries written before the kill must not be recomputed");

    let got = entries(&sharded);
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "the sharded fill holds other entries than the single-process fill");
    for (p, bytes) in &want {
        assert!(got[p] == *bytes, "{} differs between the sharded and the single-process fill", p.display());
    }
    // and a whole-split fill of the same directory finds nothing missing
    assert_eq!(counts(&json(&cache_cmd(&yaml, &sharded, &["--json"]).output().unwrap())), (0, N_IMAGES as u64, N_IMAGES as u64));
}

#[test]
fn slurm_and_kubernetes_environments_choose_the_shards_of_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dataset(dir.path());
    let n = 4;
    for i in 1..=n {
        let cache_dir = dir.path().join(format!("cache{i}"));
        // the Slurm example script itself, as task 10+i-1 of --array=10-13
        let out = Command::new("bash")
            .arg(common::root().join("examples/slurm/fill_cache.sbatch"))
            .env("FREEZESPLIT", common::bin())
            .env("DATA", &yaml)
            .env("WEIGHTS", model())
            .env("CACHE_DIR", &cache_dir)
            .env("SPLITS", "train")
            .env("CACHE_ARGS", "--engine tract --batch-size 2 --json")
            .env_remove("JOB_COMPLETION_INDEX")
            .env_remove("SLURM_ARRAY_TASK_STEP")
            .env("SLURM_CPUS_PER_TASK", "1")
            .env("SLURM_ARRAY_TASK_ID", (10 + i - 1).to_string())
            .env("SLURM_ARRAY_TASK_MIN", "10")
            .env("SLURM_ARRAY_TASK_COUNT", n.to_string())
            .output()
            .unwrap();
        let v = json(&out);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains(&format!("cache: shard {i}/{n} (from SLURM_ARRAY_TASK_ID={}, SLURM_ARRAY_TASK_MIN=10, SLURM_ARRAY_TASK_COUNT={n})", 10 + i - 1)), "{log}");
        assert_eq!(v["shard"]["index"], i);
        let want = expected_keys(&yaml, i, n);
        assert_eq!(keys_of(&entries(&cache_dir)), want, "the Slurm task filled other images than shard {i}/{n}");

        // the same shard through a Kubernetes Indexed Job's variables, and
        // through the flag: exactly these images, all already there
        let mut k8s = cache_cmd(&yaml, &cache_dir, &["--json"]);
        k8s.env("JOB_COMPLETION_INDEX", (i - 1).to_string()).env(SHARD_COUNT_VAR, n.to_string());
        let out = k8s.output().unwrap();
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("cache: shard {i}/{n} (from JOB_COMPLETION_INDEX={}, {SHARD_COUNT_VAR}={n})", i - 1)));
        assert_eq!(counts(&json(&out)), (0, want.len() as u64, want.len() as u64));
        let flag = json(&cache_cmd(&yaml, &cache_dir, &["--json", "--shard", &format!("{i}/{n}")]).output().unwrap());
        assert_eq!(counts(&flag), (0, want.len() as u64, want.len() as u64));
    }

    // without a shard the same cache says how many entries are missing, and fills them
    let cache1 = dir.path().join("cache1");
    let have = entries(&cache1).len();
    let out = cache_cmd(&yaml, &cache1, &[]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let missing = N_IMAGES - have;
    assert!(text.contains(&format!("train: {missing} of {N_IMAGES} entries were missing; {missing} filled now")), "{text}");
    assert_eq!(entries(&cache1).len(), N_IMAGES);
}

#[test]
fn bad_shards_are_refused_in_one_sentence_naming_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("data.yaml"); // never read: the shard is checked first
    for (extra, env, want) in [
        (vec!["--shard", "0/4"], vec![], "error: --shard gives shard 0 of 4: I must be from 1 to 4"),
        (vec!["--shard", "5/4"], vec![], "error: --shard gives shard 5 of 4"),
        (vec!["--shard", "two/4"], vec![], "error: --shard `two/4` is malformed"),
        (vec![], vec![("JOB_COMPLETION_INDEX", "2")], "error: JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but FREEZESPLIT_SHARD_COUNT is not"),
        (vec![], vec![("SLURM_ARRAY_TASK_ID", "4"), ("SLURM_ARRAY_TASK_MIN", "0"), ("SLURM_ARRAY_TASK_COUNT", "4")], "error: SLURM_ARRAY_TASK_ID=4, SLURM_ARRAY_TASK_MIN=0, SLURM_ARRAY_TASK_COUNT=4 gives shard 5 of 4"),
    ] {
        let mut c = cache_cmd(&yaml, &dir.path().join("cache"), &extra);
        c.envs(env);
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.starts_with(want) && err.lines().count() == 1, "{extra:?}: {err}");
    }
}

#[test]
fn kubernetes_examples_parse_and_their_shard_count_is_the_jobs_completions() {
    let read = |f: &str| -> serde_yaml::Value { serde_yaml::from_str(&std::fs::read_to_string(common::root().join("examples/k8s").join(f)).unwrap()).unwrap_or_else(|e| panic!("{f}: {e}")) };
    let fill = read("fill-cache-job.yaml");
    assert_eq!(fill["kind"], "Job");
    let spec = &fill["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    let completions = spec["completions"].as_u64().unwrap();
    assert!(spec["parallelism"].as_u64().unwrap() <= completions);
    let pod = &spec["template"]["spec"];
    let c = &pod["containers"][0];
    let env: BTreeMap<String, String> = c["env"].as_sequence().unwrap().iter().filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string()))).collect();
    assert_eq!(env[SHARD_COUNT_VAR], completions.to_string(), "{SHARD_COUNT_VAR} must equal the Job's completions");
    let args: Vec<&str> = c["command"].as_sequence().unwrap().iter().chain(c["args"].as_sequence().into_iter().flatten()).filter_map(|a| a.as_str()).collect();
    assert!(args.contains(&"cache") && !args.contains(&"--shard"), "{args:?}");
    for job in [&fill, &read("train-job.yaml")] {
        let vols = job["spec"]["template"]["spec"]["volumes"].as_sequence().unwrap();
        assert!(vols.iter().any(|v| v["persistentVolumeClaim"]["claimName"].is_string()), "the cache must be on a shared volume");
    }
    let pvc = read("cache-pvc.yaml");
    assert_eq!(pvc["kind"], "PersistentVolumeClaim");
    assert_eq!(pvc["spec"]["accessModes"][0], "ReadWriteMany");
}
