//! The deployment files (issue 7, item 6): the Kubernetes manifests under `deploy/` and the
//! `Dockerfile`. No cluster or Docker engine runs here, so these tests parse every manifest and check
//! the fields that tie the files together: names, labels and selectors, ports, probe paths, the KEK
//! Secret and `--kek-file`, the signer socket shared with kube-apiserver, the issuer, the image's
//! user and binaries, and that every flag the manifests pass is one the binaries accept.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The binaries as the manifests name them (the basename of a container's command).
const KMS: &str = "oidc-kms";
const GATEWAY: &str = "oidc-gateway";
/// The KEK Secret and its key, as deploy/10-kms.yaml tells operators to create it.
const KEK_SECRET: &str = "oidc-kms-kek";
const KEK_KEY: &str = "kek.b64";
/// The ExternalJWTSigner socket (issue 4) that kube-apiserver dials.
const SIGNER_SOCKET: &str = "/var/run/oidc-kms/signer.sock";
/// Flags kube-apiserver refuses together with --service-account-signing-endpoint.
const APISERVER_KEY_FLAGS: [&str; 2] = [
    "--service-account-key-file",
    "--service-account-signing-key-file",
];

// ---------------------------------------------------------------------------------------------
// Loading

/// One YAML document of one file under deploy/.
struct Manifest {
    file: String,
    doc: Yaml,
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_yaml(&path, out);
        } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(path);
        }
    }
}

fn manifests() -> Vec<Manifest> {
    let mut files = Vec::new();
    collect_yaml(&Path::new(ROOT).join("deploy"), &mut files);
    files.sort();
    assert!(!files.is_empty(), "no YAML files under deploy/");
    let mut out = Vec::new();
    for path in files {
        let rel = path.strip_prefix(ROOT).unwrap().display().to_string();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let docs = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{rel}: not valid YAML: {e}"));
        let before = out.len();
        // An empty document (only comments before a `---`) is no object; kubectl skips it too.
        out.extend(
            docs.into_iter()
                .filter(|d| !d.is_null())
                .map(|doc| Manifest {
                    file: rel.clone(),
                    doc,
                }),
        );
        assert!(out.len() > before, "{rel}: no YAML documents");
    }
    out
}

/// A scalar as text, whatever YAML type it was read as.
fn scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or_default()
}

impl Manifest {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or("")
    }

    fn namespace(&self) -> &str {
        self.doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
    }

    fn what(&self) -> String {
        format!(
            "{} {}/{} ({})",
            self.kind(),
            self.namespace(),
            self.name(),
            self.file
        )
    }

    /// The pod this object runs: a Pod itself, or a workload's pod template.
    fn pod(&self) -> Option<Pod<'_>> {
        let (meta, spec) = match self.kind() {
            "Pod" => (&self.doc["metadata"], &self.doc["spec"]),
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => (
                &self.doc["spec"]["template"]["metadata"],
                &self.doc["spec"]["template"]["spec"],
            ),
            _ => return None,
        };
        Some(Pod {
            m: self,
            labels: &meta["labels"],
            spec,
        })
    }
}

#[derive(Clone, Copy)]
struct Pod<'a> {
    m: &'a Manifest,
    labels: &'a Yaml,
    spec: &'a Yaml,
}

/// Where a volume mount's data comes from.
enum Volume<'a> {
    /// An entry of the pod's `volumes`.
    Spec(&'a Yaml),
    /// A StatefulSet's `volumeClaimTemplates` entry: a PersistentVolumeClaim per pod.
    ClaimTemplate,
}

impl<'a> Pod<'a> {
    fn containers(self) -> Vec<Container<'a>> {
        list(&self.spec["containers"])
            .iter()
            .map(|c| Container::new(self, c))
            .collect()
    }

    fn volume(self, name: &str) -> Option<Volume<'a>> {
        if let Some(v) = list(&self.spec["volumes"])
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
        {
            return Some(Volume::Spec(v));
        }
        let claims = if self.m.kind() == "StatefulSet" {
            list(&self.m.doc["spec"]["volumeClaimTemplates"])
        } else {
            &[]
        };
        claims
            .iter()
            .any(|t| t["metadata"]["name"].as_str() == Some(name))
            .then_some(Volume::ClaimTemplate)
    }

    /// A security setting of the container, else of the pod.
    fn security<'b>(self, c: &'b Container<'a>, key: &str) -> &'a Yaml {
        let own = &c.c["securityContext"][key];
        if own.is_badvalue() {
            &self.spec["securityContext"][key]
        } else {
            own
        }
    }
}

/// One container, with the program it runs and that program's arguments.
struct Container<'a> {
    pod: Pod<'a>,
    c: &'a Yaml,
    /// The basename of the executable: `command[0]`, else the image's ENTRYPOINT.
    program: String,
    /// The executable path as given (`command[0]` or the ENTRYPOINT).
    path: String,
    args: Vec<String>,
}

fn basename(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_owned()
}

impl<'a> Container<'a> {
    fn new(pod: Pod<'a>, c: &'a Yaml) -> Self {
        let command: Vec<String> = list(&c["command"]).iter().filter_map(scalar).collect();
        let mut argv = if command.is_empty() {
            // No command: the image's ENTRYPOINT, known for our own image only.
            if c["image"].as_str().is_some_and(|i| i.contains(KMS)) {
                dockerfile().entrypoint()
            } else {
                Vec::new()
            }
        } else {
            command
        };
        argv.extend(list(&c["args"]).iter().filter_map(scalar));
        let path = argv.first().cloned().unwrap_or_default();
        Container {
            pod,
            c,
            program: basename(&path),
            path,
            args: argv.into_iter().skip(1).collect(),
        }
    }

    fn name(&self) -> String {
        format!(
            "container {} of {}",
            self.c["name"].as_str().unwrap_or("?"),
            self.pod.m.what()
        )
    }

    /// `(--flag, value)` pairs: `--flag=value`, `--flag value`, or a bare `--flag`.
    fn flags(&self) -> Vec<(String, Option<String>)> {
        let mut out = Vec::new();
        let mut rest = self.args.iter().peekable();
        while let Some(arg) = rest.next() {
            let Some(body) = arg.strip_prefix("--") else {
                continue;
            };
            match body.split_once('=') {
                Some((name, value)) => out.push((format!("--{name}"), Some(value.to_owned()))),
                None => {
                    let value = rest.next_if(|next| !next.starts_with('-')).cloned();
                    out.push((arg.clone(), value));
                }
            }
        }
        out
    }

    fn flag(&self, name: &str) -> Option<String> {
        self.flags()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.unwrap_or_default())
    }

    fn has_flag(&self, name: &str) -> bool {
        self.flags().iter().any(|(n, _)| n == name)
    }

    /// `(name, value)` of the container's `env` entries with a literal value.
    fn env(&self) -> Vec<(String, String)> {
        list(&self.c["env"])
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?.to_owned(), scalar(&e["value"])?)))
            .collect()
    }

    fn require(&self, name: &str) -> String {
        self.flag(name)
            .unwrap_or_else(|| panic!("{}: no {name}", self.name()))
    }

    /// `--listen`, which every container of ours must give: both binaries default to loopback.
    fn listen(&self) -> SocketAddr {
        let text = self.require("--listen");
        text.parse()
            .unwrap_or_else(|e| panic!("{}: --listen={text}: {e}", self.name()))
    }

    /// A port given by number or by the name of one of this container's ports.
    fn port(&self, port: &Yaml) -> Option<i64> {
        match port {
            Yaml::Integer(n) => Some(*n),
            Yaml::String(name) => list(&self.c["ports"])
                .iter()
                .find(|p| p["name"].as_str() == Some(name))
                .and_then(|p| p["containerPort"].as_i64()),
            _ => None,
        }
    }

    fn container_ports(&self) -> Vec<i64> {
        list(&self.c["ports"])
            .iter()
            .filter_map(|p| p["containerPort"].as_i64())
            .collect()
    }

    /// The volume mount holding `path` (the longest matching mountPath) and the rest of the path.
    fn mount_for(&self, path: &str) -> Option<(&'a Yaml, String)> {
        list(&self.c["volumeMounts"])
            .iter()
            .filter_map(|m| {
                let at = m["mountPath"].as_str()?.trim_end_matches('/');
                let rest = path.strip_prefix(at)?;
                (rest.is_empty() || rest.starts_with('/'))
                    .then(|| (m, rest.trim_start_matches('/').to_owned(), at.len()))
            })
            .max_by_key(|(_, _, len)| *len)
            .map(|(m, rest, _)| (m, rest))
    }

    /// The file or directory `path` is on the host, through a hostPath volume.
    fn host_path(&self, path: &str) -> String {
        let (mount, rest) = self
            .mount_for(path)
            .unwrap_or_else(|| panic!("{}: {path} is on no volume", self.name()));
        let name = mount["name"].as_str().unwrap_or("");
        let Some(Volume::Spec(volume)) = self.pod.volume(name) else {
            panic!("{}: volume {name} (for {path}) is not defined", self.name());
        };
        let host = volume["hostPath"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: volume {name} is not a hostPath", self.name()));
        format!("{}/{rest}", host.trim_end_matches('/'))
    }
}

fn all_pods(ms: &[Manifest]) -> Vec<Pod<'_>> {
    ms.iter().filter_map(Manifest::pod).collect()
}

fn containers_running<'a>(ms: &'a [Manifest], program: &str) -> Vec<Container<'a>> {
    all_pods(ms)
        .into_iter()
        .flat_map(Pod::containers)
        .filter(|c| c.program == program)
        .collect()
}

/// The one container running `program` in a pod of `kind`.
fn the_container<'a>(ms: &'a [Manifest], program: &str, kind: &str) -> Container<'a> {
    let mut found: Vec<_> = containers_running(ms, program)
        .into_iter()
        .filter(|c| c.pod.m.kind() == kind)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} running {program} under deploy/"
    );
    found.remove(0)
}

/// Every label of `selector` (a map) is on `labels`; an empty selector selects nothing here.
fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    selector.as_hash().is_some_and(|sel| {
        !sel.is_empty()
            && sel
                .iter()
                .all(|(k, v)| k.as_str().is_some_and(|k| labels[k] == *v))
    })
}

/// The pods in `namespace` whose labels `selector` matches.
fn selected<'a>(ms: &'a [Manifest], namespace: &str, selector: &Yaml) -> Vec<Pod<'a>> {
    all_pods(ms)
        .into_iter()
        .filter(|p| p.m.namespace() == namespace && selects(selector, p.labels))
        .collect()
}

fn find<'a>(ms: &'a [Manifest], kind: &str, namespace: &str, name: &str) -> &'a Manifest {
    ms.iter()
        .find(|m| m.kind() == kind && m.namespace() == namespace && m.name() == name)
        .unwrap_or_else(|| panic!("no {kind} {namespace}/{name} under deploy/"))
}

// ---------------------------------------------------------------------------------------------
// The Dockerfile

struct Dockerfile {
    /// `(INSTRUCTION, rest of the line)`, continuation lines joined, comments dropped.
    lines: Vec<(String, String)>,
}

fn dockerfile() -> Dockerfile {
    let path = Path::new(ROOT).join("Dockerfile");
    let text = std::fs::read_to_string(&path).expect("a Dockerfile at the project root");
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (word, rest) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                lines.push((word.to_ascii_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    Dockerfile { lines }
}

impl Dockerfile {
    fn all(&self, instruction: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(i, _)| i == instruction)
            .map(|(_, rest)| rest.as_str())
            .collect()
    }

    /// The instructions of the last stage (the image that is shipped).
    fn final_stage(&self) -> &[(String, String)] {
        let start = self
            .lines
            .iter()
            .rposition(|(i, _)| i == "FROM")
            .expect("a FROM");
        &self.lines[start..]
    }

    fn last_in_final(&self, instruction: &str) -> Option<&str> {
        self.final_stage()
            .iter()
            .rev()
            .find(|(i, _)| i == instruction)
            .map(|(_, rest)| rest.as_str())
    }

    fn entrypoint(&self) -> Vec<String> {
        let raw = self
            .last_in_final("ENTRYPOINT")
            .expect("the Dockerfile has an ENTRYPOINT");
        serde_json::from_str(raw)
            .unwrap_or_else(|e| panic!("ENTRYPOINT {raw} is not the exec (JSON array) form: {e}"))
    }

    /// The numeric user and group of the final stage's USER.
    fn user(&self) -> (u32, Option<u32>) {
        let user = self
            .last_in_final("USER")
            .expect("the final stage sets USER");
        let (u, g) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user, None),
        };
        let uid = u.parse().unwrap_or_else(|_| {
            panic!("USER {user}: give a numeric UID, so Kubernetes' runAsNonRoot can check it")
        });
        (uid, g.map(|g| g.parse().expect("a numeric GID")))
    }

    /// Files the final stage copies from another stage, by destination path.
    fn copied_from_stages(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, rest) in self.final_stage() {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if i != "COPY" || !words.iter().any(|w| w.starts_with("--from=")) {
                continue;
            }
            let paths: Vec<&str> = words
                .iter()
                .copied()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let Some((dest, sources)) = paths.split_last() else {
                continue;
            };
            for source in sources {
                if dest.ends_with('/') {
                    out.push(format!("{dest}{}", basename(source)));
                } else {
                    out.push((*dest).to_owned());
                }
            }
        }
        out
    }

    fn exposed(&self) -> BTreeSet<i64> {
        self.all("EXPOSE")
            .iter()
            .flat_map(|rest| rest.split_whitespace())
            .filter_map(|p| p.split('/').next()?.parse().ok())
            .collect()
    }
}

fn version(text: &str) -> Vec<u32> {
    text.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

// ---------------------------------------------------------------------------------------------
// The binaries

fn help(bin: &str) -> String {
    let out = Command::new(bin)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{bin} --help: {e}"));
    assert!(out.status.success(), "{bin} --help failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `--flag` appears in `help` as a whole word (not as the prefix of a longer flag).
fn documents_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(at, _)| {
        help[at + flag.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    })
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_manifest_parses_and_names_itself() {
    let ms = manifests();
    let mut seen = BTreeSet::new();
    for m in &ms {
        assert!(m.doc.as_hash().is_some(), "{}: not a mapping", m.file);
        assert!(
            m.doc["apiVersion"].as_str().is_some_and(|v| !v.is_empty()),
            "{}: no apiVersion",
            m.file
        );
        assert!(!m.kind().is_empty(), "{}: no kind", m.file);
        assert!(!m.name().is_empty(), "{}: no metadata.name", m.what());
        if m.kind() != "Namespace" {
            assert!(
                m.doc["metadata"]["namespace"].as_str().is_some(),
                "{}: say the namespace, so that `kubectl apply` does not use the current one",
                m.what()
            );
        }
        assert!(
            seen.insert((
                m.kind().to_owned(),
                m.namespace().to_owned(),
                m.name().to_owned()
            )),
            "{}: defined twice",
            m.what()
        );
    }
    let kinds: BTreeSet<&str> = ms.iter().map(Manifest::kind).collect();
    assert!(
        kinds.contains("StatefulSet") || kinds.contains("Deployment"),
        "no StatefulSet or Deployment: {kinds:?}"
    );
    for kind in ["Service", "PodDisruptionBudget", "NetworkPolicy", "Pod"] {
        assert!(kinds.contains(kind), "no {kind}: {kinds:?}");
    }
    // Every namespace the in-cluster objects use is created here (kube-system exists already).
    for m in &ms {
        if m.namespace() != "kube-system" && m.kind() != "Namespace" {
            find(&ms, "Namespace", "default", m.namespace());
        }
    }
}

#[test]
fn workloads_and_services_select_their_pods() {
    let ms = manifests();
    for m in &ms {
        if matches!(m.kind(), "Deployment" | "StatefulSet") {
            let pod = m.pod().unwrap();
            assert!(
                selects(&m.doc["spec"]["selector"]["matchLabels"], pod.labels),
                "{}: spec.selector does not match the pod template's labels",
                m.what()
            );
        }
        if m.kind() == "StatefulSet" {
            let service = m.doc["spec"]["serviceName"].as_str().unwrap_or("");
            let svc = find(&ms, "Service", m.namespace(), service);
            assert_eq!(
                svc.doc["spec"]["clusterIP"].as_str(),
                Some("None"),
                "{}: the governing Service of a StatefulSet is headless",
                svc.what()
            );
            assert!(
                selects(&svc.doc["spec"]["selector"], m.pod().unwrap().labels),
                "{}: does not select the pods of {}",
                svc.what(),
                m.what()
            );
        }
        if m.kind() != "Service" {
            continue;
        }
        let pods = selected(&ms, m.namespace(), &m.doc["spec"]["selector"]);
        assert!(
            !pods.is_empty(),
            "{}: its selector matches no pod",
            m.what()
        );
        let headless = m.doc["spec"]["clusterIP"].as_str() == Some("None");
        for port in list(&m.doc["spec"]["ports"]) {
            let number = port["port"].as_i64().expect("a Service port number");
            let target = match &port["targetPort"] {
                Yaml::BadValue => Yaml::Integer(number),
                t => t.clone(),
            };
            for pod in &pods {
                let resolved: Vec<i64> = pod
                    .containers()
                    .iter()
                    .filter_map(|c| c.port(&target))
                    .filter(|p| {
                        pod.containers()
                            .iter()
                            .any(|c| c.container_ports().contains(p))
                    })
                    .collect();
                assert!(
                    !resolved.is_empty(),
                    "{}: port {number} targets {target:?}, which is no container port of {}",
                    m.what(),
                    pod.m.what()
                );
                if headless {
                    assert!(
                        resolved.contains(&number),
                        "{}: headless, so port {number} must be the container port itself",
                        m.what()
                    );
                }
            }
        }
    }
}

#[test]
fn gateway_names_the_key_service_and_its_grpc_port() {
    let ms = manifests();
    let gateways = containers_running(&ms, GATEWAY);
    assert!(!gateways.is_empty(), "no container runs {GATEWAY}");
    for gw in gateways {
        let url = gw.require("--kms");
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or_else(|| panic!("{}: --kms={url} is not an http(s) URL", gw.name()));
        let authority = rest.trim_end_matches('/');
        let (host, port) = authority
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{}: --kms={url} names no port", gw.name()));
        let port: i64 = port.parse().expect("a numeric port");
        let labels: Vec<&str> = host.split('.').collect();
        let service = labels[0];
        let namespace = labels.get(1).copied().unwrap_or(gw.pod.m.namespace());
        if let Some(third) = labels.get(2) {
            assert_eq!(
                *third,
                "svc",
                "{}: --kms={url}: not a Service name",
                gw.name()
            );
        }
        let svc = find(&ms, "Service", namespace, service);
        let svc_port = list(&svc.doc["spec"]["ports"])
            .iter()
            .find(|p| p["port"].as_i64() == Some(port))
            .unwrap_or_else(|| panic!("{}: no port {port} (from --kms={url})", svc.what()));
        // The Service leads to oidc-kms containers listening on that port.
        let pods = selected(&ms, namespace, &svc.doc["spec"]["selector"]);
        let kms: Vec<_> = pods
            .iter()
            .flat_map(|p| p.containers())
            .filter(|c| c.program == KMS)
            .collect();
        assert!(
            !kms.is_empty(),
            "{}: --kms={url} leads to no {KMS} container",
            gw.name()
        );
        for k in kms {
            let target = match &svc_port["targetPort"] {
                Yaml::BadValue => Yaml::Integer(port),
                t => t.clone(),
            };
            let listen = k.listen();
            assert_eq!(
                k.port(&target),
                Some(i64::from(listen.port())),
                "{}: --kms={url} reaches port {target:?} of {}, which listens on {listen}",
                gw.name(),
                k.name()
            );
            assert!(
                !listen.ip().is_loopback(),
                "{}: listens on loopback, unreachable for the gateway",
                k.name()
            );
        }
    }
}

#[test]
fn probes_use_the_health_endpoints_on_the_listening_port() {
    let ms = manifests();
    let proto = std::fs::read_to_string(Path::new(ROOT).join("proto/oidckms/v1/key_service.proto"))
        .unwrap();
    let package = proto
        .lines()
        .find_map(|l| l.trim().strip_prefix("package ")?.strip_suffix(';'))
        .expect("the proto's package");
    let key_service = format!("{package}.KeyService");

    let gateways = containers_running(&ms, GATEWAY);
    assert!(!gateways.is_empty(), "no container runs {GATEWAY}");
    for gw in gateways {
        let listen = i64::from(gw.listen().port());
        assert!(
            gw.container_ports().contains(&listen),
            "{}: --listen port {listen} is not a container port",
            gw.name()
        );
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &gw.c[probe]["httpGet"];
            assert_eq!(
                get["path"].as_str(),
                Some(path),
                "{}: {probe} path",
                gw.name()
            );
            assert_eq!(
                gw.port(&get["port"]),
                Some(listen),
                "{}: {probe} port is not --listen's",
                gw.name()
            );
        }
    }

    let mut probed = 0;
    for k in containers_running(&ms, KMS) {
        let listen = k.listen();
        let port = i64::from(listen.port());
        if listen.ip().is_loopback() {
            // kubelet probes the pod address: a probe of a loopback listener always fails.
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                assert!(
                    k.c[probe].is_badvalue(),
                    "{}: {probe} cannot reach a loopback --listen",
                    k.name()
                );
            }
            continue;
        }
        probed += 1;
        assert!(
            k.container_ports().contains(&port),
            "{}: --listen port {port} is not a container port",
            k.name()
        );
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let grpc = &k.c[probe]["grpc"];
            if probe == "startupProbe" && k.c[probe].is_badvalue() {
                continue;
            }
            assert_eq!(
                grpc["port"].as_i64(),
                Some(port),
                "{}: {probe} must be a grpc probe on --listen's port",
                k.name()
            );
            if let Some(service) = grpc["service"].as_str() {
                assert!(
                    service.is_empty() || service == key_service,
                    "{}: {probe} asks grpc.health.v1 about {service:?}; the server reports \"\" and {key_service}",
                    k.name()
                );
            }
        }
    }
    assert!(probed > 0, "no in-cluster {KMS} container with probes");
}

#[test]
fn pod_disruption_budget_covers_the_gateway() {
    let ms = manifests();
    let gw = the_container(&ms, GATEWAY, "Deployment");
    let deployment = gw.pod.m;
    let replicas = deployment.doc["spec"]["replicas"].as_i64().unwrap_or(1);
    assert!(replicas >= 2, "{}: at least 2 replicas", deployment.what());
    let mut covering = 0;
    for pdb in ms.iter().filter(|m| m.kind() == "PodDisruptionBudget") {
        let selector = &pdb.doc["spec"]["selector"]["matchLabels"];
        let pods = selected(&ms, pdb.namespace(), selector);
        assert!(!pods.is_empty(), "{}: selects no pods", pdb.what());
        for pod in &pods {
            let replicas = pod.m.doc["spec"]["replicas"].as_i64().unwrap_or(1);
            let min = pdb.doc["spec"]["minAvailable"]
                .as_i64()
                .expect("minAvailable as a number");
            assert!(
                min < replicas,
                "{}: minAvailable {min} with {replicas} replicas of {} would block every node drain",
                pdb.what(),
                pod.m.what()
            );
        }
        if pdb.namespace() == deployment.namespace() && selects(selector, gw.pod.labels) {
            assert_eq!(pdb.doc["spec"]["minAvailable"].as_i64(), Some(1));
            covering += 1;
        }
    }
    assert_eq!(
        covering,
        1,
        "exactly one PodDisruptionBudget selects the pods of {}",
        deployment.what()
    );
}

#[test]
fn network_policy_lets_only_the_gateway_reach_the_key_service() {
    let ms = manifests();
    let kms = the_container(&ms, KMS, "StatefulSet");
    let gw = the_container(&ms, GATEWAY, "Deployment");
    let port = i64::from(kms.listen().port());
    let policies: Vec<_> = ms
        .iter()
        .filter(|m| {
            m.kind() == "NetworkPolicy"
                && m.namespace() == kms.pod.m.namespace()
                && selects(&m.doc["spec"]["podSelector"]["matchLabels"], kms.pod.labels)
        })
        .collect();
    assert!(
        !policies.is_empty(),
        "no NetworkPolicy selects the key service's pods"
    );
    let mut gateway_allowed = false;
    for policy in policies {
        let types: Vec<_> = list(&policy.doc["spec"]["policyTypes"])
            .iter()
            .filter_map(Yaml::as_str)
            .collect();
        assert!(
            types.contains(&"Ingress"),
            "{}: policyTypes has no Ingress",
            policy.what()
        );
        for rule in list(&policy.doc["spec"]["ingress"]) {
            let ports: Vec<_> = list(&rule["ports"])
                .iter()
                .filter_map(|p| kms.port(&p["port"]))
                .collect();
            assert!(
                !ports.is_empty(),
                "{}: an ingress rule without ports opens every port",
                policy.what()
            );
            let from = list(&rule["from"]);
            assert!(
                !from.is_empty(),
                "{}: an ingress rule without `from` admits everyone",
                policy.what()
            );
            if ports.contains(&port)
                && from.iter().any(|peer| {
                    peer["namespaceSelector"].is_badvalue()
                        && gw.pod.m.namespace() == policy.namespace()
                        && selects(&peer["podSelector"]["matchLabels"], gw.pod.labels)
                })
            {
                gateway_allowed = true;
            }
        }
    }
    assert!(
        gateway_allowed,
        "no NetworkPolicy rule lets the gateway pods reach port {port}"
    );
}

#[test]
fn kek_and_data_dir_are_where_the_flags_point() {
    let ms = manifests();
    let mut from_secret = 0;
    for k in containers_running(&ms, KMS) {
        let kek = k.require("--kek-file");
        let (mount, file) = k
            .mount_for(&kek)
            .unwrap_or_else(|| panic!("{}: --kek-file={kek} is on no volume", k.name()));
        assert_eq!(
            mount["readOnly"].as_bool(),
            Some(true),
            "{}: mount the KEK read-only",
            k.name()
        );
        let name = mount["name"].as_str().unwrap_or("");
        let Some(Volume::Spec(volume)) = k.pod.volume(name) else {
            panic!("{}: volume {name} is not defined", k.name());
        };
        let secret = &volume["secret"];
        if !secret.is_badvalue() {
            from_secret += 1;
            assert_eq!(
                secret["secretName"].as_str(),
                Some(KEK_SECRET),
                "{}",
                k.name()
            );
            assert_ne!(
                secret["optional"].as_bool(),
                Some(true),
                "{}: the KEK is not optional",
                k.name()
            );
            let items = list(&secret["items"]);
            let item = items
                .iter()
                .find(|i| i["path"].as_str() == Some(file.as_str()));
            let key = match item {
                Some(i) => i["key"].as_str().unwrap_or(""),
                None if items.is_empty() => file.as_str(),
                None => panic!(
                    "{}: --kek-file={kek}: no Secret item has path {file}",
                    k.name()
                ),
            };
            assert_eq!(
                key,
                KEK_KEY,
                "{}: --kek-file={kek} reads Secret key {key}",
                k.name()
            );
            let mode = item
                .map(|i| &i["mode"])
                .filter(|m| !m.is_badvalue())
                .unwrap_or(&secret["defaultMode"]);
            assert_eq!(
                mode.as_i64(),
                Some(0o400),
                "{}: KEK file mode must be 0400, written as decimal 256 (YAML 1.1 and 1.2 disagree on a leading 0)",
                k.name()
            );
        } else {
            assert!(
                !volume["hostPath"].is_badvalue(),
                "{}: the KEK comes from neither a Secret nor (static pod) a host path",
                k.name()
            );
            assert_eq!(
                k.pod.m.kind(),
                "Pod",
                "{}: a host-path KEK is for static pods",
                k.name()
            );
        }

        // The sealed store must outlive the pod, on a writable volume other than the KEK's.
        let data = k.require("--data-dir");
        let (data_mount, _) = k.mount_for(&data).unwrap_or_else(|| {
            panic!(
                "{}: --data-dir={data} is on no volume (and the root filesystem is read-only)",
                k.name()
            )
        });
        assert_ne!(
            data_mount["readOnly"].as_bool(),
            Some(true),
            "{}: --data-dir is read-only",
            k.name()
        );
        let data_volume = data_mount["name"].as_str().unwrap_or("");
        assert_ne!(
            data_volume,
            name,
            "{}: keep the KEK apart from the keys it seals",
            k.name()
        );
        match k.pod.volume(data_volume) {
            Some(Volume::ClaimTemplate) => {}
            Some(Volume::Spec(v))
                if !v["persistentVolumeClaim"].is_badvalue() || !v["hostPath"].is_badvalue() => {}
            _ => panic!(
                "{}: --data-dir={data} is on volume {data_volume}, which is not persistent",
                k.name()
            ),
        }
    }
    assert!(
        from_secret > 0,
        "no {KMS} workload reads its KEK from Secret {KEK_SECRET}"
    );
    let kms = the_container(&ms, KMS, "StatefulSet");
    assert_eq!(
        kms.pod.m.doc["spec"]["replicas"].as_i64(),
        Some(1),
        "the sealed store is single-writer: one replica"
    );
}

#[test]
fn kube_apiserver_and_oidc_kms_share_the_signer_socket_and_issuer() {
    let ms = manifests();
    let apiserver = the_container(&ms, "kube-apiserver", "Pod");
    let signer = the_container(&ms, KMS, "Pod");
    for c in [&apiserver, &signer] {
        assert_eq!(
            c.pod.m.namespace(),
            "kube-system",
            "{}: a static pod",
            c.name()
        );
        assert_eq!(
            c.pod.spec["hostNetwork"].as_bool(),
            Some(true),
            "{}: control-plane static pods run on the host network",
            c.name()
        );
    }
    let endpoint = apiserver.require("--service-account-signing-endpoint");
    let socket = signer.require("--k8s-signer-socket");
    assert_eq!(endpoint, SIGNER_SOCKET);
    assert_eq!(
        socket, endpoint,
        "oidc-kms creates a socket kube-apiserver does not dial"
    );
    for flag in APISERVER_KEY_FLAGS {
        assert!(
            !apiserver.has_flag(flag),
            "{}: kube-apiserver refuses {flag} together with the signing endpoint",
            apiserver.name()
        );
    }
    // Both see the socket through the same host directory (not a mount of the socket file
    // itself, which would go stale when oidc-kms replaces the socket).
    for c in [&apiserver, &signer] {
        let (mount, rest) = c
            .mount_for(&socket)
            .unwrap_or_else(|| panic!("{}: {socket} is on no volume", c.name()));
        assert!(
            !rest.is_empty(),
            "{}: mount the socket's directory, not the socket",
            c.name()
        );
        if c.program == KMS {
            assert_ne!(
                mount["readOnly"].as_bool(),
                Some(true),
                "{}: oidc-kms creates the socket",
                c.name()
            );
        }
    }
    assert_eq!(
        apiserver.host_path(&endpoint),
        signer.host_path(&socket),
        "kube-apiserver and oidc-kms see different host paths for the socket"
    );

    // One issuer: kube-apiserver's, and every oidc-kms's (the signer refuses a foreign iss).
    let issuer = apiserver.require("--service-account-issuer");
    assert!(
        issuer.starts_with("https://"),
        "--service-account-issuer={issuer}: https"
    );
    for k in containers_running(&ms, KMS) {
        assert_eq!(k.require("--issuer"), issuer, "{}: --issuer", k.name());
    }
}

#[test]
fn containers_are_locked_down_and_match_the_image() {
    let ms = manifests();
    let docker = dockerfile();
    let (uid, gid) = docker.user();
    let copied = docker.copied_from_stages();
    let exposed = docker.exposed();
    let mut images = BTreeSet::new();
    let ours: Vec<_> = all_pods(&ms)
        .into_iter()
        .flat_map(Pod::containers)
        .filter(|c| c.program == KMS || c.program == GATEWAY)
        .collect();
    assert!(!ours.is_empty());
    for c in &ours {
        let pod = c.pod;
        let who = c.name();
        images.insert(c.c["image"].as_str().unwrap_or("").to_owned());
        assert!(
            copied.contains(&c.path),
            "{who}: runs {}, which the image does not have",
            c.path
        );
        assert_eq!(
            pod.security(c, "runAsNonRoot").as_bool(),
            Some(true),
            "{who}: runAsNonRoot"
        );
        assert_eq!(
            pod.security(c, "runAsUser").as_i64(),
            Some(i64::from(uid)),
            "{who}: runAsUser is not the image's USER"
        );
        if let Some(gid) = gid {
            assert_eq!(
                pod.security(c, "runAsGroup").as_i64(),
                Some(i64::from(gid)),
                "{who}: runAsGroup"
            );
        }
        let sc = &c.c["securityContext"];
        assert_eq!(
            sc["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{who}: readOnlyRootFilesystem"
        );
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{who}: allowPrivilegeEscalation"
        );
        assert!(
            list(&sc["capabilities"]["drop"])
                .iter()
                .any(|d| d.as_str() == Some("ALL")),
            "{who}: drop ALL capabilities"
        );
        assert_eq!(
            pod.security(c, "seccompProfile")["type"].as_str(),
            Some("RuntimeDefault"),
            "{who}: seccompProfile"
        );
        assert_eq!(
            pod.spec["automountServiceAccountToken"].as_bool(),
            Some(false),
            "{who}: neither binary calls the Kubernetes API"
        );
        for (section, resource) in [
            ("requests", "cpu"),
            ("requests", "memory"),
            ("limits", "cpu"),
            ("limits", "memory"),
        ] {
            assert!(
                scalar(&c.c["resources"][section][resource]).is_some(),
                "{who}: resources.{section}.{resource}"
            );
        }
        for port in c.container_ports() {
            assert!(
                exposed.contains(&port),
                "{who}: port {port} is not EXPOSEd by the image"
            );
        }
    }
    assert_eq!(
        images.len(),
        1,
        "both binaries come from one image: {images:?}"
    );
    let image = images.into_iter().next().unwrap();
    assert!(
        image
            .rsplit_once(':')
            .is_some_and(|(_, tag)| tag != "latest" && !tag.contains('/')),
        "{image}: pin a version tag"
    );
}

#[test]
fn every_flag_is_one_the_binaries_accept() {
    let ms = manifests();
    let kms_help = help(env!("CARGO_BIN_EXE_oidc-kms"));
    let gateway_help = help(env!("CARGO_BIN_EXE_oidc-gateway"));
    let mut checked = 0;
    for c in all_pods(&ms).into_iter().flat_map(Pod::containers) {
        let help = match c.program.as_str() {
            KMS => &kms_help,
            GATEWAY => &gateway_help,
            _ => continue,
        };
        let mut seen = BTreeSet::new();
        for (flag, _) in c.flags() {
            assert!(
                seen.insert(flag.clone()),
                "{}: {flag} given twice",
                c.name()
            );
            assert!(
                documents_flag(help, &flag),
                "{}: {} does not accept {flag} (not in its --help)",
                c.name(),
                c.program
            );
            checked += 1;
        }
        // The binaries' own environment variables (clap lists each as `[env: NAME=]`).
        for (name, _) in c.env() {
            if !name.starts_with("OIDC_") {
                continue;
            }
            assert!(
                help.contains(&format!("[env: {name}=")),
                "{}: {} reads no environment variable {name} (not in its --help)",
                c.name(),
                c.program
            );
            checked += 1;
        }
        // Issue 5 refuses plaintext gRPC on a non-loopback address unless --insecure-plaintext is
        // given. Once the binary knows that flag, an in-cluster --listen=0.0.0.0 needs TLS flags or
        // the explicit opt-out (flag or environment variable), or the pod would crash-loop.
        if c.program == KMS && documents_flag(&kms_help, "--insecure-plaintext") {
            let listen = c.listen();
            let opted_out = c.has_flag("--insecure-plaintext")
                || c.env()
                    .iter()
                    .any(|(n, v)| n == "OIDC_KMS_INSECURE_PLAINTEXT" && v == "true");
            assert!(
                listen.ip().is_loopback()
                    || opted_out
                    || c.flags().iter().any(|(f, _)| f.starts_with("--tls")),
                "{}: --listen={listen} without TLS is refused at start-up: add the TLS flags, or \
                 --insecure-plaintext inside the NetworkPolicy-protected namespace",
                c.name()
            );
        }
    }
    assert!(checked > 0, "no flags checked");
}

#[test]
fn dockerfile_builds_both_binaries_into_a_small_non_root_image() {
    let docker = dockerfile();
    let froms = docker.all("FROM");
    assert!(froms.len() >= 2, "a multi-stage build: {froms:?}");
    let builder = froms[0];
    let (uid, _) = docker.user();
    assert_ne!(uid, 0, "USER must not be root");

    // The builder compiles both binaries in release mode, with a toolchain no older than the
    // crate's rust-version.
    let builds_both = |r: &&str| {
        let words: Vec<&str> = r.split_whitespace().collect();
        let named = |bin| words.windows(2).any(|w| w == ["--bin", bin]);
        r.contains("cargo build")
            && words.contains(&"--release")
            && (words.contains(&"--bins") || (named(KMS) && named(GATEWAY)))
    };
    assert!(
        docker.all("RUN").iter().any(builds_both),
        "no `cargo build --release --bins` step"
    );
    let cargo_toml = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap();
    let msrv = cargo_toml
        .lines()
        .find_map(|l| Some(l.trim().strip_prefix("rust-version = ")?.trim_matches('"')))
        .expect("rust-version in Cargo.toml");
    if builder.contains("${RUST_VERSION}") {
        let arg = docker
            .all("ARG")
            .into_iter()
            .find_map(|a| a.strip_prefix("RUST_VERSION="))
            .expect("ARG RUST_VERSION=... for the builder image");
        assert!(
            version(arg) >= version(msrv),
            "builder Rust {arg} is older than rust-version {msrv}"
        );
    }

    let copied = docker.copied_from_stages();
    for bin in [KMS, GATEWAY] {
        assert!(
            copied.iter().any(|p| basename(p) == bin),
            "the final stage does not copy {bin} from the builder: {copied:?}"
        );
    }
    let entrypoint = docker.entrypoint();
    assert_eq!(
        entrypoint.first().map(|p| basename(p)).as_deref(),
        Some(KMS)
    );
    assert!(
        copied.contains(&entrypoint[0]),
        "ENTRYPOINT {} is not copied in",
        entrypoint[0]
    );
    let exposed = docker.exposed();
    for port in [50051, 8080] {
        assert!(exposed.contains(&port), "EXPOSE {port}: {exposed:?}");
    }

    let ignore = std::fs::read_to_string(Path::new(ROOT).join(".dockerignore"))
        .expect("a .dockerignore beside the Dockerfile");
    let ignored: Vec<&str> = ignore.lines().map(str::trim).collect();
    for entry in ["target/", ".git/"] {
        assert!(
            ignored.contains(&entry) || ignored.contains(&entry.trim_end_matches('/')),
            ".dockerignore leaves {entry} in the build context"
        );
    }
}
