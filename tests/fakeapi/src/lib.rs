//! An in-process fake API server for `kube::Client`: just the routes the integration uses, with
//! list/watch (history replayed from the requested resourceVersion), merge-patched status, field
//! selectors on `spec.nodeName` / `metadata.name`, and injectable 403s. It runs as a tower service,
//! so tests work under paused tokio time without sockets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub const PODS: &str = "/api/v1/pods";
pub const NODES: &str = "/api/v1/nodes";
pub const POOLS: &str = "/apis/vnet-cni.io/v1alpha1/nodeippools";
/// Leases are namespaced: `/apis/coordination.k8s.io/v1/namespaces/<ns>/leases[/<name>]`. The
/// fake keeps them under this collection, keyed `<ns>/<name>`.
pub const LEASES: &str = "/apis/coordination.k8s.io/v1/leases";
const LEASE_GROUP: &str = "/apis/coordination.k8s.io/v1/namespaces/";

type Body = UnsyncBoxBody<Bytes, Infallible>;

struct Watch {
    events: mpsc::UnboundedSender<Bytes>,
}

/// A collection's watches: those without a selector, and those with a field selector indexed by
/// (JSON pointer, value), so an event reaches its watchers without a look at every other one
/// (5,000 agents each watch their own NodeIPPool by name in the cluster simulation).
#[derive(Default)]
struct Watches {
    all: Vec<Watch>,
    selected: HashMap<(String, String), Vec<Watch>>,
    /// The pointers the selected watches use.
    pointers: BTreeSet<String>,
}

#[derive(Default)]
struct State {
    /// collection -> "namespace/name" or "name" -> object
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    resource_version: u64,
    history: Vec<(u64, &'static str, Value)>,
    /// Where in `history` each object's events are, by collection and `metadata.name`: a watch
    /// of one object by name (every agent watches its own NodeIPPool so, and its kube-rs
    /// watcher resumes every ~5 min) replays its object's events, not the whole history's.
    history_by_name: HashMap<(&'static str, String), Vec<usize>>,
    watches: HashMap<&'static str, Watches>,
    /// (method, path prefix) answered with 403.
    forbidden: Vec<(Method, String)>,
    pub requests: Vec<String>,
    /// Every request as the RBAC authorizer sees it: "group/resource:verb".
    authorizations: BTreeSet<String>,
}

/// Like the real API server, the fake authorizes every request against the agent's ClusterRole
/// (deploy/manifests/rbac.yaml): what it does not grant is answered 403, so the scenarios run
/// with exactly the permissions an installed agent has.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    granted: Arc<BTreeSet<String>>,
    /// The ServiceAccount (named like its ClusterRole) the requests are made as.
    account: Arc<str>,
}

impl Default for FakeApi {
    /// Requests authorized as the agent's ServiceAccount.
    fn default() -> Self {
        FakeApi::with_role(AGENT_ROLE)
    }
}

/// The agent's ClusterRole in deploy/manifests/rbac.yaml.
pub const AGENT_ROLE: &str = "vnet-cni-agent";

impl FakeApi {
    /// Requests authorized as a ServiceAccount bound to `cluster_role` of deploy/manifests/rbac.yaml.
    pub fn with_role(cluster_role: &str) -> Self {
        FakeApi {
            state: Arc::default(),
            granted: Arc::new(granted_by(cluster_role)),
            account: Arc::from(format!("system:serviceaccount:kube-system:{cluster_role}")),
        }
    }
}

fn collection_of(path: &str) -> Option<&'static str> {
    [PODS, NODES, POOLS]
        .into_iter()
        .find(|c| path == *c || path.starts_with(&format!("{c}/")))
}

fn key_of(object: &Value) -> String {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

fn matches(object: &Value, selector: &Option<(String, String)>) -> bool {
    let Some((field, value)) = selector else {
        return true;
    };
    object.pointer(&pointer_of(field)).and_then(Value::as_str) == Some(value.as_str())
}

/// The JSON pointer of a field selector's field (`metadata.name` -> `/metadata/name`).
fn pointer_of(field: &str) -> String {
    format!("/{}", field.replace('.', "/"))
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed_unsync())
        .unwrap()
}

fn status_error(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).unwrap(),
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (key, value) in fields {
                if value.is_null() {
                    target.as_object_mut().unwrap().remove(key);
                } else {
                    merge(&mut target[key.as_str()], value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl FakeApi {
    pub fn client(&self) -> kube::Client {
        let fake = self.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let fake = fake.clone();
            async move { Ok::<_, Infallible>(fake.handle(request).await) }
        });
        kube::Client::new(service, "default")
    }

    /// A client of its own and the switch that cuts it off: while the switch is on, every
    /// request of this client (and only of it) is answered 503, as when its replica loses the
    /// API server (a leader that can no longer renew its Lease).
    pub fn client_with_switch(&self) -> (kube::Client, Arc<std::sync::atomic::AtomicBool>) {
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fake = self.clone();
        let off = cut.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let fake = fake.clone();
            let off = off.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                if off {
                    return Ok::<_, Infallible>(status_error(
                        503,
                        "ServiceUnavailable",
                        "cut off from the API server",
                    ));
                }
                Ok(fake.handle(request).await)
            }
        });
        (kube::Client::new(service, "default"), cut)
    }

    pub fn forbid(&self, method: Method, path_prefix: &str) {
        self.state
            .lock()
            .unwrap()
            .forbidden
            .push((method, path_prefix.to_string()));
    }

    pub fn allow_everything(&self) {
        self.state.lock().unwrap().forbidden.clear();
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// What the requests so far needed from RBAC, as "group/resource:verb" (core group empty).
    pub fn authorizations(&self) -> BTreeSet<String> {
        self.state.lock().unwrap().authorizations.clone()
    }

    /// Every write so far, in order: (resourceVersion, collection, the watch event).
    pub fn events(&self) -> Vec<(u64, &'static str, Value)> {
        self.state.lock().unwrap().history.clone()
    }

    pub fn get(&self, collection: &'static str, key: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .get(collection)
            .and_then(|objects| objects.get(key))
            .cloned()
    }

    pub fn put(&self, collection: &'static str, object: Value) -> Value {
        let mut state = self.state.lock().unwrap();
        state.put(collection, object)
    }

    pub fn delete(&self, collection: &'static str, key: &str) {
        let mut state = self.state.lock().unwrap();
        if let Some(mut object) = state
            .objects
            .get_mut(collection)
            .and_then(|o| o.remove(key))
        {
            state.resource_version += 1;
            object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            state.emit(collection, "DELETED", object);
        }
    }

    async fn handle(&self, request: Request<kube::client::Body>) -> Response<Body> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query: BTreeMap<String, String> = request
            .uri()
            .query()
            .map(|q| {
                q.split('&')
                    .filter_map(|pair| pair.split_once('='))
                    .map(|(k, v)| (k.to_string(), percent_decode(v)))
                    .collect()
            })
            .unwrap_or_default();
        let body = request
            .into_body()
            .collect_bytes()
            .await
            .unwrap_or_default();
        let mut state = self.state.lock().unwrap();
        state.requests.push(format!("{method} {path}"));
        let watch = query.get("watch").map(String::as_str) == Some("true");
        let Some(authorization) = authorization(&method, &path, watch) else {
            return status_error(404, "NotFound", "no such route");
        };
        state.authorizations.insert(authorization.clone());
        if !self.granted.contains(&authorization) {
            let message = format!(
                "{authorization} is forbidden: not granted to {} by deploy/manifests/rbac.yaml",
                self.account
            );
            return status_error(403, "Forbidden", &message);
        }
        if let Some((_, prefix)) = state
            .forbidden
            .iter()
            .find(|(m, prefix)| *m == method && path.starts_with(prefix.as_str()))
        {
            let message = format!(
                "{prefix} is forbidden: User \"{}\" cannot {method} it",
                self.account
            );
            return status_error(403, "Forbidden", &message);
        }
        if let Some(rest) = path.strip_prefix(LEASE_GROUP) {
            return state.lease_route(&method, rest, &body);
        }
        let Some(collection) = collection_of(&path) else {
            return status_error(404, "NotFound", "no such route");
        };
        let rest: Vec<&str> = path[collection.len()..]
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        match (method, rest.as_slice()) {
            (Method::GET, []) => {
                let selector = query
                    .get("fieldSelector")
                    .and_then(|s| s.split_once('='))
                    .map(|(f, v)| (f.to_string(), v.to_string()));
                if query.get("watch").map(String::as_str) == Some("true") {
                    let since: u64 = query
                        .get("resourceVersion")
                        .and_then(|rv| rv.parse().ok())
                        .unwrap_or(0);
                    state.watch(collection, selector, since)
                } else {
                    state.list(collection, &selector)
                }
            }
            (Method::GET, [name]) => match state.objects.get(collection).and_then(|o| o.get(*name))
            {
                Some(object) => json_response(StatusCode::OK, object),
                None => status_error(404, "NotFound", &format!("{name} not found")),
            },
            (Method::POST, []) => {
                let mut object: Value = serde_json::from_slice(&body).unwrap();
                let key = key_of(&object);
                if state
                    .objects
                    .get(collection)
                    .is_some_and(|o| o.contains_key(&key))
                {
                    return status_error(409, "AlreadyExists", &format!("{key} already exists"));
                }
                // The status subresource: a create ignores the status.
                object.as_object_mut().unwrap().remove("status");
                let object = state.put(collection, object);
                json_response(StatusCode::CREATED, &object)
            }
            (Method::PATCH, [name, "status"]) => {
                let Some(mut object) = state
                    .objects
                    .get(collection)
                    .and_then(|o| o.get(*name))
                    .cloned()
                else {
                    return status_error(404, "NotFound", &format!("{name} not found"));
                };
                let patch: Value = serde_json::from_slice(&body).unwrap();
                merge(&mut object["status"], &patch["status"]);
                let object = state.put(collection, object);
                json_response(StatusCode::OK, &object)
            }
            _ => status_error(405, "MethodNotAllowed", "not supported by the fake"),
        }
    }
}

impl State {
    /// GET/POST/PUT of namespaced Leases; a PUT whose `resourceVersion` is not the stored one
    /// is answered 409 Conflict, as the API server's optimistic concurrency does.
    fn lease_route(&mut self, method: &Method, rest: &str, body: &[u8]) -> Response<Body> {
        let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let stored =
            |state: &State, key: &str| state.objects.get(LEASES).and_then(|o| o.get(key)).cloned();
        match (method.clone(), parts.as_slice()) {
            (Method::GET, [ns, "leases", name]) => match stored(self, &format!("{ns}/{name}")) {
                Some(lease) => json_response(StatusCode::OK, &lease),
                None => status_error(404, "NotFound", &format!("leases \"{name}\" not found")),
            },
            (Method::POST, [ns, "leases"]) => {
                let mut lease: Value = match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(e) => return status_error(400, "BadRequest", &e.to_string()),
                };
                lease["metadata"]["namespace"] = json!(ns);
                let key = key_of(&lease);
                if stored(self, &key).is_some() {
                    return status_error(409, "AlreadyExists", &format!("{key} already exists"));
                }
                let lease = self.put(LEASES, lease);
                json_response(StatusCode::CREATED, &lease)
            }
            (Method::PUT, [ns, "leases", name]) => {
                let mut lease: Value = match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(e) => return status_error(400, "BadRequest", &e.to_string()),
                };
                let key = format!("{ns}/{name}");
                let Some(current) = stored(self, &key) else {
                    return status_error(404, "NotFound", &format!("leases \"{name}\" not found"));
                };
                let given = lease["metadata"]["resourceVersion"].as_str();
                if given
                    .is_some_and(|rv| Some(rv) != current["metadata"]["resourceVersion"].as_str())
                {
                    return status_error(
                        409,
                        "Conflict",
                        &format!(
                            "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    );
                }
                lease["metadata"]["namespace"] = json!(ns);
                lease["metadata"]["name"] = json!(name);
                lease["metadata"]["uid"] = current["metadata"]["uid"].clone();
                let lease = self.put(LEASES, lease);
                json_response(StatusCode::OK, &lease)
            }
            _ => status_error(405, "MethodNotAllowed", "not supported by the fake"),
        }
    }

    fn put(&mut self, collection: &'static str, mut object: Value) -> Value {
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{}", self.resource_version));
        }
        let key = key_of(&object);
        let existed = self
            .objects
            .entry(collection)
            .or_default()
            .insert(key, object.clone())
            .is_some();
        self.emit(
            collection,
            if existed { "MODIFIED" } else { "ADDED" },
            object.clone(),
        );
        object
    }

    fn emit(&mut self, collection: &'static str, kind: &str, object: Value) {
        let event = json!({"type": kind, "object": object});
        if let Some(name) = event["object"]["metadata"]["name"].as_str() {
            self.history_by_name
                .entry((collection, name.to_string()))
                .or_default()
                .push(self.history.len());
        }
        self.history
            .push((self.resource_version, collection, event.clone()));
        let line = Bytes::from(format!("{event}\n"));
        let Some(watches) = self.watches.get_mut(collection) else {
            return;
        };
        watches.all.retain(|w| w.events.send(line.clone()).is_ok());
        for pointer in &watches.pointers {
            let Some(value) = event["object"].pointer(pointer).and_then(Value::as_str) else {
                continue;
            };
            if let Some(selected) = watches
                .selected
                .get_mut(&(pointer.clone(), value.to_string()))
            {
                selected.retain(|w| w.events.send(line.clone()).is_ok());
            }
        }
    }

    fn list(
        &self,
        collection: &'static str,
        selector: &Option<(String, String)>,
    ) -> Response<Body> {
        let items: Vec<Value> = self
            .objects
            .get(collection)
            .map(|o| {
                o.values()
                    .filter(|v| matches(v, selector))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let (api_version, kind) = match collection {
            PODS => ("v1", "PodList"),
            NODES => ("v1", "NodeList"),
            _ => ("vnet-cni.io/v1alpha1", "NodeIPPoolList"),
        };
        json_response(
            StatusCode::OK,
            &json!({"apiVersion": api_version, "kind": kind,
                    "metadata": {"resourceVersion": self.resource_version.to_string()},
                    "items": items}),
        )
    }

    fn watch(
        &mut self,
        collection: &'static str,
        selector: Option<(String, String)>,
        since: u64,
    ) -> Response<Body> {
        let (events, receiver) = mpsc::unbounded_channel();
        // The history is in resourceVersion order: a watch resumed from a recent version (a
        // kube-rs watcher does every ~5 min) replays only what came after it.
        let by_name = match &selector {
            Some((field, name)) if field == "metadata.name" => Some(
                self.history_by_name
                    .get(&(collection, name.clone()))
                    .map_or(&[][..], Vec::as_slice),
            ),
            _ => None,
        };
        let replay: Vec<&Value> = match by_name {
            Some(at) => {
                let start = at.partition_point(|&i| self.history[i].0 <= since);
                at[start..].iter().map(|&i| &self.history[i].2).collect()
            }
            None => {
                let start = self.history.partition_point(|(rv, _, _)| *rv <= since);
                self.history[start..]
                    .iter()
                    .filter(|(_, c, event)| {
                        *c == collection && matches(&event["object"], &selector)
                    })
                    .map(|(_, _, event)| event)
                    .collect()
            }
        };
        for event in replay {
            let _ = events.send(Bytes::from(format!("{event}\n")));
        }
        let watches = self.watches.entry(collection).or_default();
        match selector {
            None => watches.all.push(Watch { events }),
            Some((field, value)) => {
                let pointer = pointer_of(&field);
                watches.pointers.insert(pointer.clone());
                watches
                    .selected
                    .entry((pointer, value))
                    .or_default()
                    .push(Watch { events });
            }
        }
        let stream = tokio_stream_from(receiver).map(|line| Ok::<_, Infallible>(Frame::data(line)));
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(StreamBody::new(stream).boxed_unsync())
            .unwrap()
    }
}

fn tokio_stream_from(
    mut receiver: mpsc::UnboundedReceiver<Bytes>,
) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// The RBAC attributes of a request, as the API server's authorizer derives them:
/// `/api/v1/[namespaces/<ns>/]<resource>[/<name>[/<subresource>]]` or
/// `/apis/<group>/<version>/...`, and the verb from the method (a GET of a collection is `list`, or
/// `watch` with `watch=true`).
pub fn authorization(method: &Method, path: &str, watch: bool) -> Option<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _namespace, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, subresource] => (format!("{resource}/{subresource}"), true),
        _ => return None,
    };
    let verb = match (method.clone(), named) {
        (Method::GET, false) if watch => "watch",
        (Method::GET, false) => "list",
        (Method::GET, true) => "get",
        (Method::POST, _) => "create",
        (Method::PUT, _) => "update",
        (Method::PATCH, _) => "patch",
        (Method::DELETE, false) => "deletecollection",
        (Method::DELETE, true) => "delete",
        _ => return None,
    };
    Some(format!("{group}/{resource}:{verb}"))
}

/// The agent's ClusterRole in deploy/manifests/rbac.yaml, as "group/resource:verb".
pub fn granted_by_the_cluster_role() -> BTreeSet<String> {
    granted_by(AGENT_ROLE)
}

/// The RBAC files the fake reads: the agent's, and cluster mode's (the allocator's).
const RBAC_FILES: [&str; 2] = [
    "deploy/manifests/rbac.yaml",
    "deploy/cluster-mode/rbac.yaml",
];

/// A ClusterRole of deploy/manifests/rbac.yaml or deploy/cluster-mode/rbac.yaml, with the Role
/// of the same name if there is one (the allocator's Leases in its namespace), as
/// "group/resource:verb". The fake does not check the namespace of a Role's grants.
pub fn granted_by(cluster_role: &str) -> BTreeSet<String> {
    let mut roles = Vec::new();
    for file in RBAC_FILES {
        let path = format!("{}/../../{file}", env!("CARGO_MANIFEST_DIR"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        roles.extend(
            serde_yaml::Deserializer::from_str(&text)
                .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
                .filter(|doc| {
                    (doc["kind"] == "ClusterRole" || doc["kind"] == "Role")
                        && doc["metadata"]["name"] == cluster_role
                }),
        );
    }
    assert!(
        roles.iter().any(|r| r["kind"] == "ClusterRole"),
        "ClusterRole {cluster_role} in {RBAC_FILES:?}"
    );
    let mut granted = BTreeSet::new();
    for rule in roles.iter().flat_map(|r| r["rules"].as_sequence().unwrap()) {
        let list = |key: &str| -> Vec<String> {
            rule[key]
                .as_sequence()
                .unwrap_or_else(|| panic!("rule without {key}: {rule:?}"))
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        assert!(
            rule.get("resourceNames").is_none(),
            "resourceNames cannot express the agent's own node"
        );
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    assert_ne!(verb, "*", "no wildcard verbs");
                    granted.insert(format!("{group}/{resource}:{verb}"));
                }
            }
        }
    }
    granted
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watch events a fresh watch has been sent so far, as (resourceVersion, name).
    async fn replayed(response: Response<Body>) -> Vec<(u64, String)> {
        let mut body = response.into_body();
        let mut seen = Vec::new();
        let next = std::time::Duration::from_millis(100);
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(next, body.frame()).await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let event: Value = serde_json::from_slice(line).unwrap();
                let meta = &event["object"]["metadata"];
                let rv = meta["resourceVersion"].as_str().unwrap().parse().unwrap();
                seen.push((rv, meta["name"].as_str().unwrap().to_string()));
            }
        }
        seen
    }

    #[tokio::test]
    async fn a_resumed_watch_replays_what_came_after_its_version_and_only_what_it_selects() {
        let mut state = State::default();
        for n in 0..3 {
            for name in ["a", "b"] {
                state.put(POOLS, json!({"metadata": {"name": name}, "spec": {"n": n}}));
            }
        }
        // Versions: a 1, b 2, a 3, b 4, a 5, b 6; and a Node named "a" at 7.
        state.put(NODES, json!({"metadata": {"name": "a"}}));
        let by_name = Some(("metadata.name".to_string(), "a".to_string()));
        let a = |rvs: &[u64]| {
            rvs.iter()
                .map(|&rv| (rv, "a".to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            replayed(state.watch(POOLS, by_name.clone(), 2)).await,
            a(&[3, 5])
        );
        assert_eq!(
            replayed(state.watch(POOLS, by_name.clone(), 0)).await,
            a(&[1, 3, 5])
        );
        assert_eq!(
            replayed(state.watch(POOLS, by_name.clone(), 5)).await,
            a(&[])
        );
        assert_eq!(replayed(state.watch(NODES, by_name, 0)).await, a(&[7]));
        // Another field: the whole history after the version, filtered.
        let by_uid = Some(("metadata.uid".to_string(), "uid-4".to_string()));
        assert_eq!(
            replayed(state.watch(POOLS, by_uid, 0)).await,
            [(4, "b".to_string())]
        );
        let all = replayed(state.watch(POOLS, None, 3)).await;
        let rvs: Vec<u64> = all.iter().map(|(rv, _)| *rv).collect();
        assert_eq!(rvs, [4, 5, 6]);
    }
}
