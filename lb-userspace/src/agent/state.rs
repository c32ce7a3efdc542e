//! The agent's state as its HTTP endpoints report it: kube-proxy's health (`/healthz`,
//! `/livez`), the metrics (`metrics`), and the names of the programmed frontends.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use lb_control::source::Changes;
use serde::{Deserialize, Serialize};

use super::metrics::{CodeLabel, Metrics};

/// How long a change may wait for the datapath before the agent says it is unhealthy: as
/// kube-proxy's default (2 × its 30 s sync period, `healthTimeout` in `proxy_health.go`).
pub const HEALTH_TIMEOUT: Duration = Duration::from_mins(1);

/// The agent's state as its endpoints report it (`/healthz`, `/livez`, health check node
/// ports, `/debug/frontends`), updated by the agent's loop.
pub struct AgentState {
    /// When the datapath last matched the desired state.
    pub last_synced: Option<SystemTime>,
    /// When the oldest change the datapath has not programmed yet was queued (None: the
    /// datapath has everything).
    pub oldest_pending: Option<Instant>,
    /// How long that change may wait before the agent is unhealthy.
    pub health_timeout: Duration,
    /// Whether this node may take traffic (kube-proxy's `nodeEligible`, from the Node).
    pub node_eligible: bool,
    /// Every programmed frontend entry by service id, for `lb-agent flows` and operators.
    pub frontends: BTreeMap<u32, FrontendName>,
    metrics: Arc<Metrics>,
}

impl AgentState {
    pub fn new(metrics: Arc<Metrics>, health_timeout: Duration) -> Self {
        AgentState {
            last_synced: None,
            oldest_pending: None,
            health_timeout,
            node_eligible: true,
            frontends: BTreeMap::new(),
            metrics,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A change arrived that the datapath does not have yet.
    pub fn queued(&mut self) {
        self.oldest_pending.get_or_insert_with(Instant::now);
        self.metrics.queued(SystemTime::now());
    }

    /// Changes the source received (counted; pending until the next sync).
    pub fn record_changes(&mut self, c: Changes) {
        if c != Changes::default() {
            self.metrics.changes(c);
        }
    }

    /// The datapath has everything there was to program (without a sync: nothing to do).
    pub fn up_to_date(&mut self) {
        self.oldest_pending = None;
    }

    /// A successful sync that took `took`: the datapath has everything queued before it.
    pub fn record_sync(&mut self, took: Duration) {
        let now = SystemTime::now();
        self.metrics.synced(took, now);
        self.last_synced = Some(now);
        self.oldest_pending = None;
    }

    /// An EndpointSlice change (its trigger time) has reached the datapath after `took`.
    pub fn record_programming(&self, took: Duration) {
        self.metrics.programming.observe(took.as_secs_f64());
    }

    /// kube-proxy's health (`proxy_health.go`), without the node's eligibility: no change has
    /// waited for the datapath for the health timeout or longer; and, here, the datapath was
    /// programmed once (kube-proxy is healthy while it starts). A failed sync alone does not
    /// make the agent unhealthy: the change it did not program does, once it is that late.
    pub fn healthy(&self, now: Instant) -> bool {
        self.last_synced.is_some()
            && self
                .oldest_pending
                .is_none_or(|queued| now.saturating_duration_since(queued) < self.health_timeout)
    }
}

/// One programmed frontend entry, as `/debug/frontends` lists it (and `lb-agent flows`
/// reads it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendName {
    /// The entry's service id (which flow events carry).
    pub id: u32,
    /// `address:port/protocol`.
    pub frontend: String,
    /// `namespace/name:port`.
    pub service: String,
}

/// Which of kube-proxy's health endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz`: health and the node's eligibility.
    Healthz,
    /// `/livez`: health alone.
    Livez,
}

/// The agent's state, shared by its loop and its HTTP servers, and its metrics.
#[derive(Clone)]
pub struct SharedState {
    state: Arc<Mutex<AgentState>>,
    metrics: Arc<Metrics>,
    /// Held through a scrape (the datapath's counters read, then rendered), so that
    /// concurrent scrapes do not interleave.
    scrape: Arc<Mutex<()>>,
}

impl SharedState {
    pub fn new(metrics: Metrics, health_timeout: Duration) -> Self {
        let metrics = Arc::new(metrics);
        SharedState {
            state: Arc::new(Mutex::new(AgentState::new(metrics.clone(), health_timeout))),
            metrics,
            scrape: Arc::default(),
        }
    }

    /// The state, locked. A lock poisoned by a thread that panicked while holding it is taken
    /// over (the state holds only reports, each field written whole) and said so.
    pub fn lock(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(|poisoned| {
            tracing::error!(
                "the agent state's lock was poisoned (a thread panicked holding it); carrying on \
                 with the state as it was left"
            );
            poisoned.into_inner()
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// `/healthz` or `/livez`: the status code and body, counted by code.
    pub fn probe(&self, probe: Probe) -> (u16, String) {
        let (code, body) = health_response(&self.lock(), probe, Instant::now());
        let family = match probe {
            Probe::Healthz => &self.metrics.healthz,
            Probe::Livez => &self.metrics.livez,
        };
        family.get_or_create(&CodeLabel { code }).inc();
        (code, body)
    }

    /// `/metrics`: `refresh` (which reads the datapath's counters into the metrics), then
    /// everything rendered.
    pub fn scrape(&self, refresh: &(dyn Fn(&Metrics) + Send + Sync)) -> String {
        let _one = self
            .scrape
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        refresh(&self.metrics);
        self.metrics.render()
    }
}

fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

/// kube-proxy's /healthz and /livez (`pkg/proxy/healthcheck/proxy_health.go`): 200 when
/// healthy (and, for /healthz, the node eligible), else 503; the body says when the datapath
/// was last programmed.
pub fn health_response(status: &AgentState, probe: Probe, now: Instant) -> (u16, String) {
    let healthy = status.healthy(now);
    let last = status.last_synced.map(rfc3339).unwrap_or_default();
    let current = rfc3339(SystemTime::now());
    let (ok, body) = match probe {
        Probe::Healthz => (
            healthy && status.node_eligible,
            serde_json::json!({"lastUpdated": last, "currentTime": current, "nodeEligible": status.node_eligible}),
        ),
        Probe::Livez => (
            healthy,
            serde_json::json!({"lastUpdated": last, "currentTime": current}),
        ),
    };
    (if ok { 200 } else { 503 }, body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(timeout: Duration) -> AgentState {
        AgentState::new(Arc::new(Metrics::new("manifests", false)), timeout)
    }

    #[test]
    fn unhealthy_until_the_first_sync() {
        let mut s = state(HEALTH_TIMEOUT);
        let now = Instant::now();
        let (code, body) = health_response(&s, Probe::Healthz, now);
        assert_eq!(code, 503);
        assert!(body.contains("\"nodeEligible\":true"), "{body}");
        assert!(body.contains("\"lastUpdated\":\"\""), "{body}");
        s.record_sync(Duration::from_millis(3));
        let (code, body) = health_response(&s, Probe::Healthz, now);
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert!(
            v["lastUpdated"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{body}"
        );
        let (code, body) = health_response(&s, Probe::Livez, now);
        assert_eq!(code, 200);
        assert!(!body.contains("nodeEligible"), "{body}");
    }

    #[test]
    fn a_change_waiting_longer_than_the_timeout_makes_it_unhealthy() {
        let timeout = Duration::from_mins(1);
        let mut s = state(timeout);
        s.record_sync(Duration::from_millis(3));
        s.queued();
        let queued = s.oldest_pending.expect("queued");
        assert!(s.healthy(queued + Duration::from_secs(59)));
        assert!(!s.healthy(queued + timeout));
        assert_eq!(health_response(&s, Probe::Livez, queued + timeout).0, 503);
        // Later changes do not move the oldest one.
        s.queued();
        assert_eq!(s.oldest_pending, Some(queued));
        // Programmed: healthy again, whatever the failed attempts in between.
        s.record_sync(Duration::from_millis(3));
        assert!(s.healthy(queued + timeout * 2));
        s.queued();
        s.up_to_date();
        assert!(s.healthy(queued + timeout * 3));
    }

    #[test]
    fn healthz_but_not_livez_follows_the_nodes_eligibility() {
        let mut s = state(HEALTH_TIMEOUT);
        s.record_sync(Duration::from_millis(3));
        s.node_eligible = false;
        let now = Instant::now();
        let (code, body) = health_response(&s, Probe::Healthz, now);
        assert_eq!(code, 503);
        assert!(body.contains("\"nodeEligible\":false"), "{body}");
        assert_eq!(health_response(&s, Probe::Livez, now).0, 200);
    }
}
