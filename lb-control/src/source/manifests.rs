//! Reading the Kubernetes objects the agent consumes from YAML (or JSON) manifests, as
//! `kubectl apply -f` takes them: multi-document files, `kind: List`, Services,
//! EndpointSlices and Pods. Other kinds are ignored.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::api::{core::v1::Pod, core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;

use super::{Changes, Dirty, Objects, ServiceIndex, ServiceKey, Source};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: document {doc}: not valid YAML: {source}")]
    Yaml {
        path: PathBuf,
        doc: usize,
        source: serde_yaml::Error,
    },
    #[error("{path}: {object}: {reason}")]
    Invalid {
        path: PathBuf,
        object: String,
        reason: String,
    },
    #[error("--manifests {}: not a directory", .0.display())]
    NotADirectory(PathBuf),
}

/// Whether a file name is one the agent reads.
pub fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Parses one file. Any error rejects the whole file: a half-read file would drop objects.
pub fn parse_file(path: &Path, text: &str) -> Result<Objects, ManifestError> {
    let mut objects = Objects::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|source| ManifestError::Yaml {
            path: path.to_owned(),
            doc: i + 1,
            source,
        })?;
        add_value(path, &value, &mut objects)?;
    }
    Ok(objects)
}

fn describe(value: &serde_yaml::Value) -> String {
    let get = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let meta = value.get("metadata");
    let meta_get = |k: &str| {
        meta.and_then(|m| m.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    format!(
        "{} {}/{}",
        get("kind").unwrap_or_else(|| "<no kind>".into()),
        meta_get("namespace").unwrap_or_else(|| "default".into()),
        meta_get("name").unwrap_or_else(|| "<no name>".into())
    )
}

fn add_value(
    path: &Path,
    value: &serde_yaml::Value,
    objects: &mut Objects,
) -> Result<(), ManifestError> {
    if value.is_null() {
        return Ok(()); // an empty document, e.g. after a trailing `---`
    }
    let invalid = |value: &serde_yaml::Value, reason: String| ManifestError::Invalid {
        path: path.to_owned(),
        object: describe(value),
        reason,
    };
    let Some(kind) = value.get("kind").and_then(|k| k.as_str()) else {
        return Err(invalid(value, "no kind".into()));
    };
    match kind {
        "List" => {
            let items = value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default();
            for item in items {
                add_value(path, &item, objects)?;
            }
        }
        "Service" => {
            let svc: Service =
                serde_yaml::from_value(value.clone()).map_err(|e| invalid(value, e.to_string()))?;
            super::validate::service(&svc).map_err(|r| invalid(value, r.to_string()))?;
            objects.services.push(svc);
        }
        "EndpointSlice" => {
            let slice: EndpointSlice =
                serde_yaml::from_value(value.clone()).map_err(|e| invalid(value, e.to_string()))?;
            super::validate::endpoint_slice(&slice).map_err(|r| invalid(value, r.to_string()))?;
            objects.slices.push(slice);
        }
        "Pod" => {
            let pod: Pod =
                serde_yaml::from_value(value.clone()).map_err(|e| invalid(value, e.to_string()))?;
            super::validate::pod(&pod).map_err(|r| invalid(value, r.to_string()))?;
            objects.pods.push(pod);
        }
        other => tracing::debug!(path = %path.display(), kind = other, "ignoring object"),
    }
    Ok(())
}

/// A manifest folder with the last good objects of each file.
///
/// A file that stops parsing keeps contributing its last good objects, so a bad edit never
/// removes anything from the datapath; a deleted file removes its objects.
#[derive(Default)]
pub struct ManifestDir {
    files: BTreeMap<PathBuf, FileState>,
    /// What the scans changed since `take_dirty`.
    dirty: Dirty,
    /// The objects the scans changed since `take_changes`.
    changes: Changes,
}

struct FileState {
    stamp: Stamp,
    objects: Objects,
    index: ServiceIndex,
}

/// What tells a file changed: modification time and length.
type Stamp = (std::time::SystemTime, u64);

/// The result of a scan.
pub struct Scan {
    /// Some file was added, changed or removed since the previous scan.
    pub changed: bool,
    /// Files that could not be used this time (their last good objects are kept).
    pub errors: Vec<ManifestError>,
}

impl ManifestDir {
    /// Rereads the files of `dir` that changed since the last scan.
    pub fn scan(&mut self, dir: &Path) -> Result<Scan, ManifestError> {
        let read_err = |source| ManifestError::Read {
            path: dir.to_owned(),
            source,
        };
        let mut present = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            let Ok(meta) = entry.metadata() else {
                continue; // removed while listing
            };
            if !meta.is_file() {
                continue;
            }
            let stamp = (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len());
            present.insert(path, stamp);
        }

        let mut changed = false;
        let mut errors = Vec::new();
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains_key(*p))
            .cloned()
            .collect();
        for p in gone {
            if let Some(f) = self.files.remove(&p) {
                self.dirty.note(&f.objects);
                self.changes
                    .add(Changes::between(&f.objects, &Objects::default()));
                changed = true;
            }
        }
        for (path, stamp) in present {
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|source| ManifestError::Read {
                    path: path.clone(),
                    source,
                })
                .and_then(|text| parse_file(&path, &text));
            match parsed {
                Ok(objects) => {
                    self.dirty.note(&objects);
                    let old = self.files.get(&path).map(|f| &f.objects);
                    self.changes.add(Changes::between(
                        old.unwrap_or(&Objects::default()),
                        &objects,
                    ));
                    let index = ServiceIndex::of(&objects);
                    let state = FileState {
                        stamp,
                        objects,
                        index,
                    };
                    if let Some(old) = self.files.insert(path, state) {
                        self.dirty.note(&old.objects);
                    }
                    changed = true;
                }
                Err(e) => {
                    // Remember the stamp so the error is reported once per change,
                    // but keep the last good objects.
                    if let Some(f) = self.files.get_mut(&path) {
                        f.stamp = stamp;
                    } else {
                        self.files.insert(
                            path,
                            FileState {
                                stamp,
                                objects: Objects::default(),
                                index: ServiceIndex::default(),
                            },
                        );
                    }
                    errors.push(e);
                }
            }
        }
        Ok(Scan { changed, errors })
    }

    /// The Services changed by the scans since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    /// The objects changed by the scans since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// The named Services, their EndpointSlices and every Pod.
    pub fn objects_for(&self, keys: &BTreeSet<ServiceKey>) -> Objects {
        let mut out = Objects::default();
        for f in self.files.values() {
            f.index.pick(&f.objects, keys, &mut out);
            out.pods.extend(f.objects.pods.iter().cloned());
        }
        out
    }

    /// All objects of all files.
    pub fn objects(&self) -> Objects {
        let mut all = Objects::default();
        for f in self.files.values() {
            all.extend(&f.objects);
        }
        all
    }
}

/// The manifests source (standalone mode): a folder read as `kubectl apply -f` takes it,
/// polled for changes.
pub struct ManifestSource {
    dir: PathBuf,
    files: ManifestDir,
}

impl ManifestSource {
    /// A source reading `dir`, which must be a folder.
    pub fn new(dir: &Path) -> Result<Self, ManifestError> {
        if !dir.is_dir() {
            return Err(ManifestError::NotADirectory(dir.to_owned()));
        }
        Ok(ManifestSource {
            dir: dir.to_owned(),
            files: ManifestDir::default(),
        })
    }
}

impl Source for ManifestSource {
    fn name(&self) -> &'static str {
        "manifests"
    }

    fn poll(&mut self) -> bool {
        match self.files.scan(&self.dir) {
            Ok(scan) => {
                for e in &scan.errors {
                    tracing::error!("{e}; keeping the last good state of that file");
                }
                scan.changed
            }
            Err(e) => {
                tracing::error!("{e}; keeping the last good state");
                false
            }
        }
    }

    fn ready(&self) -> bool {
        true
    }

    fn objects(&self) -> Objects {
        self.files.objects()
    }

    fn objects_for(&self, keys: &BTreeSet<ServiceKey>) -> Objects {
        self.files.objects_for(keys)
    }

    fn take_dirty(&mut self) -> Dirty {
        self.files.take_dirty()
    }

    fn take_changes(&mut self) -> Changes {
        self.files.take_changes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn multi_document_file_with_list_and_unknown_kinds() {
        let text = r"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: web-1, labels: {app: web}}
  spec: {containers: [{name: c, image: nginx}]}
---
";
        let o = parse_file(Path::new("a.yaml"), text).expect("parses");
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.pods.len(), 1);
        assert_eq!(o.slices.len(), 0);
    }

    #[test]
    fn the_index_picks_a_services_objects_only() {
        let slice = |name: &str, ns: &str, svc: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, \
                 namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
                 addressType: IPv4\nendpoints: []\n---\n"
            )
        };
        let service = |name: &str, ns: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
                 spec: {{ports: [{{port: 80}}]}}\n---\n"
            )
        };
        let text = [
            service("web", "shop"),
            service("web", "default"),
            service("db", "shop"),
            slice("web-1", "shop", "web"),
            slice("web-2", "shop", "web"),
            slice("web-3", "default", "web"),
            slice("db-1", "shop", "db"),
        ]
        .concat();
        let o = parse_file(Path::new("a.yaml"), &text).expect("parses");
        let index = ServiceIndex::of(&o);
        let mut out = Objects::default();
        let keys: BTreeSet<ServiceKey> = [ServiceKey::new("shop", "web")].into();
        index.pick(&o, &keys, &mut out);
        let names = |v: Vec<&ObjectMeta>| -> Vec<String> {
            v.iter()
                .map(|m| {
                    format!(
                        "{}/{}",
                        m.namespace.clone().unwrap_or_default(),
                        m.name.clone().unwrap_or_default()
                    )
                })
                .collect()
        };
        assert_eq!(
            names(out.services.iter().map(|s| &s.metadata).collect()),
            ["shop/web"]
        );
        assert_eq!(
            names(out.slices.iter().map(|s| &s.metadata).collect()),
            ["shop/web-1", "shop/web-2"]
        );
        let mut none = Objects::default();
        let gone: BTreeSet<ServiceKey> = [ServiceKey::new("shop", "cache")].into();
        index.pick(&o, &gone, &mut none);
        assert!(none.services.is_empty() && none.slices.is_empty());
    }

    #[test]
    fn errors_name_file_object_and_reason() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports: [{port: 99999}]\n";
        let err = parse_file(Path::new("/m/web.yaml"), text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("/m/web.yaml: Service shop/web: "), "{msg}");
        assert!(msg.contains("99999"), "{msg}");

        let err = parse_file(Path::new("/m/x.yaml"), "kind: [unclosed").unwrap_err();
        assert!(err
            .to_string()
            .starts_with("/m/x.yaml: document 1: not valid YAML"));

        let err = parse_file(
            Path::new("/m/y.yaml"),
            "apiVersion: v1\nkind: Service\nspec: 3\n",
        )
        .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("/m/y.yaml: Service default/<no name>: "));
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_objects() {
        let dir = std::env::temp_dir().join(format!("lb-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        let other = "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";
        std::fs::write(dir.join("a.yaml"), good).expect("write");
        std::fs::write(dir.join("b.yaml"), other).expect("write");
        std::fs::write(dir.join("notes.txt"), "not a manifest").expect("write");
        let mut m = ManifestDir::default();
        let scan = m.scan(&dir).expect("scan");
        assert!(scan.changed && scan.errors.is_empty());
        assert_eq!(m.objects().services.len(), 2);

        std::fs::write(dir.join("a.yaml"), "apiVersion: v1\nkind: Service\nspec: [")
            .expect("write");
        let scan = m.scan(&dir).expect("scan");
        assert_eq!(scan.errors.len(), 1);
        assert!(scan.errors[0].to_string().contains("a.yaml"));
        assert_eq!(m.objects().services.len(), 2, "last good objects stay");

        // Unchanged bad file: not reported again.
        let scan = m.scan(&dir).expect("scan");
        assert!(scan.errors.is_empty() && !scan.changed);

        std::fs::remove_file(dir.join("b.yaml")).expect("rm");
        let scan = m.scan(&dir).expect("scan");
        assert!(scan.changed);
        assert_eq!(m.objects().services.len(), 1);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn scans_count_the_objects_that_changed_as_the_api_would() {
        let dir = std::env::temp_dir().join(format!("lb-changes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n";
        let slice = |ip: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: a-1, \
                 labels: {{kubernetes.io/service-name: a}}}}\naddressType: IPv4\n\
                 endpoints: [{{addresses: [\"{ip}\"]}}]\n"
            )
        };
        let mut m = ManifestDir::default();
        std::fs::write(dir.join("a.yaml"), format!("{svc}{}", slice("10.0.0.1"))).expect("write");
        m.scan(&dir).expect("scan");
        let both = Changes {
            services: 1,
            endpoints: 1,
        };
        assert_eq!(m.take_changes(), both, "first read: both added");
        assert_eq!(m.take_changes(), Changes::default(), "taken");
        // The file rewritten with the Service unchanged: one endpoint change only.
        std::fs::write(dir.join("a.yaml"), format!("{svc}{}  ", slice("10.0.0.2"))).expect("write");
        m.scan(&dir).expect("scan");
        let one_slice = Changes {
            services: 0,
            endpoints: 1,
        };
        assert_eq!(m.take_changes(), one_slice);
        std::fs::remove_file(dir.join("a.yaml")).expect("rm");
        m.scan(&dir).expect("scan");
        assert_eq!(m.take_changes(), both, "both deleted");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
