//! Worker identity against hostile task code. Each worker incarnation has
//! its own credential, handed over on stdin and kept out of every
//! environment a task inherits or can read; the master takes a caller's
//! identity from the credential, never from the body. A task that gathers
//! everything it can read (its environment, every /proc/*/environ and
//! cmdline it may open, files in /tmp) and tries the worker routes with each
//! of them, speaking for another worker, is refused every time, and the
//! other worker's task and lock are untouched.

use std::time::Duration;

use flotilla_e2e::*;
use serde_json::{json, Value};

const TOKEN: &str = "api-token-never-seen-by-tasks-5b1c";

/// Python task code: collect every readable secret-looking string, then
/// call every worker route with each one as the bearer, naming worker 1.
const ATTACK: &str = r#"
import os, json, glob, urllib.request, urllib.error
found = set(v for v in os.environ.values())
sources = {'env': len(found), 'proc_readable': 0, 'proc_denied': 0}
for path in glob.glob('/proc/[0-9]*/environ') + glob.glob('/proc/[0-9]*/cmdline'):
    try:
        data = open(path, 'rb').read().decode('utf-8', 'replace')
        sources['proc_readable'] += 1
    except OSError:
        sources['proc_denied'] += 1
        continue
    for part in data.split('\0'):
        found.add(part.split('=', 1)[-1])
for path in glob.glob('/tmp/*') + glob.glob('/tmp/*/*'):
    if not os.path.isfile(path):
        continue  # a FIFO nobody writes would block the read
    try:
        found.add(open(path).read(4096).strip())
    except (OSError, UnicodeDecodeError):
        pass
# Anything that could be a token: no whitespace, not a path or a list of them.
candidates = sorted(s for s in found
                    if 8 <= len(s) <= 300 and not any(c.isspace() for c in s)
                    and not s.startswith('/') and ':/' not in s)
url = os.environ['FLOTILLA_MASTER_URL']
bodies = {
    '/internal/heartbeat': {'worker_id': 1, 'incarnation': 1},
    '/internal/poll': {'worker_id': 1, 'incarnation': 1, 'slot': 0},
    '/internal/register': {'worker_id': 1, 'incarnation': 1, 'slots': 1, 'pid': 1},
}
def call(job):
    token, route = job
    req = urllib.request.Request(url + route, data=json.dumps(bodies[route]).encode(),
                                 headers={'Content-Type': 'application/json',
                                          'Authorization': 'Bearer ' + token}, method='POST')
    try:
        return str(urllib.request.urlopen(req, timeout=5).status)
    except urllib.error.HTTPError as e:
        return str(e.code)
    except Exception as e:
        return type(e).__name__
from concurrent.futures import ThreadPoolExecutor
statuses = {}
with ThreadPoolExecutor(16) as pool:
    for code in pool.map(call, [(t, r) for t in candidates + [''] for r in bodies]):
        statuses[code] = statuses.get(code, 0) + 1
response = {'statuses': statuses, 'sources': sources, 'tried': len(candidates),
            'saw_api_token': any('API_TOKEN_MARK' in s for s in found)}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn task_code_cannot_speak_for_a_worker_with_anything_it_can_read() {
    let manifest = format!(
        "{}  resources:\n    - {{ name: total, type: Integer, initialValue: 0 }}\n",
        native_manifest(&[1, 1], 0.5, 5.0, 3)
    );
    let c = Cluster::start_with(&manifest, &[], &[("FLOTILLA_TOKEN", TOKEN)])
        .await
        .unwrap();
    // Worker 1 runs a task holding the write lock while the attack runs.
    let victim = c
        .send_to_path(
            "/send/1",
            "import time\nwith write_resource('total') as t:\n    time.sleep(4)\n    t.value += 1\nresponse = t.value",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let attack = ATTACK.replace("API_TOKEN_MARK", TOKEN);
    let id = c.send_to_path("/send/0", &attack).await.unwrap();
    let t = c.wait_task(id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(t["state"], "succeeded", "{t}");
    let r = &t["result"]["response"];
    assert_eq!(
        r["saw_api_token"], false,
        "the API token reached task code: {r}"
    );
    assert!(r["tried"].as_u64().unwrap() > 5, "{r}");
    // Every call refused: 401 (not a credential) or 403 (someone else's).
    let statuses = r["statuses"].as_object().unwrap();
    for (code, n) in statuses {
        assert!(code == "401" || code == "403", "{n} calls got {code}: {r}");
    }
    // The victim is untouched: its task finishes on its worker, once, and
    // its write went through under its own lock.
    let v = c.wait_task(victim, Duration::from_secs(60)).await.unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["node"], 1);
    assert_eq!(v["attempts"], 1, "{v}");
    assert_eq!(v["result"]["response"], 1);
    let (_, total) = c.get("/resources/total").await.unwrap();
    assert_eq!(total["value"], 1);
    let nodes = c.nodes().await.unwrap();
    assert_eq!(nodes[1]["incarnation"], 1, "worker 1 was never replaced");
    assert_eq!(nodes[1]["state"], "active");
}

/// The worker's own credential cannot be replayed for another worker, and
/// a slot beyond the worker's is refused, both with a clear error.
#[tokio::test(flavor = "multi_thread")]
async fn a_credential_speaks_only_for_its_own_worker_and_slots() {
    let c = Cluster::start(&native_manifest(&[1, 1], 0.5, 5.0, 3))
        .await
        .unwrap();
    // No credential at all, or a made-up one: 401.
    for token in [None, Some("0.1.0000"), Some("1.1.deadbeef")] {
        let mut req = c
            .http
            .post(format!("{}/internal/heartbeat", c.url))
            .json(&json!({"worker_id": 1, "incarnation": 1}));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{token:?}");
        let body: Value = resp.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("credential"),
            "{body}"
        );
    }
    // The routes are still reachable only with a credential the master
    // issued; the shape of one is visible to nobody but its worker, so
    // the rest is covered by the unit tests of Cluster::verify_credential
    // and by the attack above.
    assert_eq!(c.health().await.unwrap()["active_nodes"], 2);
}

/// Python task code: read every environment and command line it may
/// (the shell task holding a lock included), look for a lease, and try to
/// publish a value with every string found, as the lock holder would.
const LEASE_HUNT: &str = r#"
import os, json, glob, urllib.request, urllib.error
found = set(os.environ.values())
saw_door = saw_lease = False
for path in glob.glob('/proc/[0-9]*/environ') + glob.glob('/proc/[0-9]*/cmdline'):
    try:
        data = open(path, 'rb').read().decode('utf-8', 'replace')
    except OSError:
        continue
    saw_door |= 'FLOTILLA_LOCK_FD=' in data
    saw_lease |= 'FLOTILLA_LEASE' in data
    for part in data.split('\0'):
        found.add(part.split('=', 1)[-1])
# The shell's door cannot be opened from here either.
opened = 0
for path in glob.glob('/proc/[0-9]*/fd/*'):
    try:
        if 'socket:' in os.readlink(path):
            os.close(os.open(path, os.O_RDWR))
            opened += 1
    except OSError:
        pass
candidates = sorted(s for s in found if 8 <= len(s) <= 300 and not any(c.isspace() for c in s))
url = os.environ['FLOTILLA_MASTER_URL']
statuses = {}
for lease in candidates:
    for token in (1, 2, 3):
        body = {'lease': lease, 'action': 'release', 'name': 'total', 'mode': 'write',
                'value': 666, 'token': token}
        req = urllib.request.Request(url + '/internal/lock', data=json.dumps(body).encode(),
                                     headers={'Content-Type': 'application/json'}, method='POST')
        try:
            code = str(urllib.request.urlopen(req, timeout=5).status)
        except urllib.error.HTTPError as e:
            code = str(e.code)
        except Exception as e:
            code = type(e).__name__
        statuses[code] = statuses.get(code, 0) + 1
response = {'statuses': statuses, 'tried': len(candidates), 'saw_door': saw_door,
            'saw_lease': saw_lease, 'sockets_opened': opened}
"#;

/// A shell task's lock lease is not readable by other tasks: while a shell
/// task holds a write lock, a task that reads every /proc/*/environ and
/// cmdline it can (the shell's among them) finds no lease, cannot open the
/// shell's lock door, and publishes nothing; the shell task's own release
/// goes through.
#[tokio::test(flavor = "multi_thread")]
async fn a_shell_task_s_lease_is_not_readable_by_other_tasks() {
    let manifest = format!(
        "{}  resources:\n    - {{ name: total, type: Integer, initialValue: 0 }}\n",
        native_manifest(&[1, 1], 0.5, 5.0, 3)
    );
    let c = Cluster::start(&manifest).await.unwrap();
    let victim_script = r#"grant=$(flotilla-worker lock acquire write total) || exit 1
token=$(echo "$grant" | python3 -c 'import sys, json; print(json.load(sys.stdin)["token"])')
sleep 5
flotilla-worker lock release write total --value 1 --token $token"#;
    let (status, sent) = c
        .post(
            "/send/1",
            json!({"type": "shell", "command": victim_script}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{sent}");
    let victim = sent["task_id"].as_u64().unwrap();
    // The attack starts once the shell task holds the lock.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, r) = c.get("/resources/total").await.unwrap();
        if r["holders"].as_array().is_some_and(|h| !h.is_empty()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never locked: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = c.send_to_path("/send/0", LEASE_HUNT).await.unwrap();
    let t = c.wait_task(id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(t["state"], "succeeded", "{t}");
    let r = &t["result"]["response"];
    assert_eq!(
        r["saw_door"], true,
        "the hunt read the shell task's environment: {r}"
    );
    assert_eq!(r["saw_lease"], false, "a lease in an environment: {r}");
    assert_eq!(r["sockets_opened"], 0, "{r}");
    assert!(r["tried"].as_u64().unwrap() > 5, "{r}");
    for (code, n) in r["statuses"].as_object().unwrap() {
        assert!(!code.starts_with('2'), "{n} lock calls got {code}: {r}");
    }
    let v = c.wait_task(victim, Duration::from_secs(60)).await.unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["attempts"], 1, "{v}");
    let (_, total) = c.get("/resources/total").await.unwrap();
    assert_eq!(total["value"], 1, "only the holder's write landed: {total}");
}
