//! Carrying the schedule out: one task per planned fault sleeps until its start, does the harmful half (kill,
//! pause, cut, slow restart), sleeps until its end and does the healing half (restart, resume, restore, normal
//! restart). Each half is recorded in the history with the times it really took.
//!
//! When the load window ends the `stop` signal fires: a fault not started yet is skipped, and one in progress
//! heals at once, so that after `stop` every task finishes within a restart's time.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::history::{Entry, FaultEvent, FaultTag, FaultWhat, Recorder};
use super::procs::Instance;
use super::schedule::{FaultKind, PlannedFault};
use super::world::{step, World, RESTART_TIMEOUT, TERMINATE_GRACE};

/// How long an instance fault waits for another instance to serve before it is skipped.
const CLAIM_WAIT: Duration = Duration::from_secs(10);

/// Carries out one planned fault (see the module's doc).
pub async fn inject(
    world: Arc<World>,
    recorder: Arc<Recorder>,
    fault: PlannedFault,
    slow_latency_ms: u64,
    mut stop: watch::Receiver<bool>,
) {
    if !wait_until(&recorder, fault.start_ms, &mut stop).await {
        return;
    }
    let faulty = Faulty {
        world: &world,
        recorder: &recorder,
        fault,
    };
    match (fault.kind, fault.instance) {
        (FaultKind::KillRedis, _) => faulty.kill_redis(&mut stop).await,
        (FaultKind::CutPostgres, _) => faulty.cut_postgres(&mut stop).await,
        (kind, Some(i)) => {
            faulty
                .on_instance(kind, i, slow_latency_ms, &mut stop)
                .await
        }
        (_, None) => {}
    }
}

/// Sleeps until `ms` on the run's clock; false if `stop` fired first (or had fired).
async fn wait_until(recorder: &Recorder, ms: u64, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        () = tokio::time::sleep_until(recorder.at(ms)) => true,
        _ = stop.wait_for(|stopped| *stopped) => false,
    }
}

struct Faulty<'a> {
    world: &'a World,
    recorder: &'a Recorder,
    fault: PlannedFault,
}

impl Faulty<'_> {
    async fn kill_redis(&self, stop: &mut watch::Receiver<bool>) {
        let mut redis = self.world.redis.lock().await;
        step(self.recorder, FaultWhat::KillRedis, None, async {
            redis.kill().await;
            Ok(String::from("SIGKILL"))
        })
        .await;
        wait_until(self.recorder, self.fault.end_ms, stop).await;
        step(self.recorder, FaultWhat::RestartRedis, None, async {
            redis
                .restart()
                .await
                .map(|()| format!("port {}", redis.port))
        })
        .await;
    }

    async fn cut_postgres(&self, stop: &mut watch::Receiver<bool>) {
        let proxy = &self.world.proxy;
        step(self.recorder, FaultWhat::CutPostgres, None, async {
            proxy.cut();
            Ok(format!("{} connections proxied so far", proxy.accepted()))
        })
        .await;
        wait_until(self.recorder, self.fault.end_ms, stop).await;
        step(self.recorder, FaultWhat::RestorePostgres, None, async {
            proxy.restore();
            Ok(String::new())
        })
        .await;
    }

    /// Kill, pause or slow instance `i`, once another instance serves; then heal it.
    async fn on_instance(
        &self,
        kind: FaultKind,
        i: usize,
        slow_latency_ms: u64,
        stop: &mut watch::Receiver<bool>,
    ) {
        let (harm, heal) = match kind {
            FaultKind::KillInstance => (FaultWhat::KillInstance, FaultWhat::RestartInstance),
            FaultKind::StopInstance => (FaultWhat::StopInstance, FaultWhat::ContInstance),
            _ => (FaultWhat::SlowGatewayOn, FaultWhat::SlowGatewayOff),
        };
        let Some(slot) = self.world.instances.get(i) else {
            return;
        };
        let mut instance = slot.lock().await;
        if !self.world.wait_claim_down(i, CLAIM_WAIT).await {
            self.skipped(harm, i).await;
            return;
        }
        let spec = &self.world.spec;
        let harmed = step(self.recorder, harm, Some(i), async {
            match kind {
                FaultKind::KillInstance => {
                    instance.kill().await;
                    Ok(String::from("SIGKILL"))
                }
                FaultKind::StopInstance => instance.pause().await.map(|()| String::from("SIGSTOP")),
                _ => restart(&mut instance, spec, slow_latency_ms).await,
            }
        })
        .await;
        // A slow instance serves (slowly) until its fault ends; the others are down meanwhile.
        if kind == FaultKind::SlowGateway && harmed {
            self.world.mark_serving(i, instance.addr());
        }
        wait_until(self.recorder, self.fault.end_ms, stop).await;
        if kind == FaultKind::SlowGateway && !self.world.wait_claim_down(i, CLAIM_WAIT).await {
            // Restarting it now would take the last serving instance down; the heal after the run does it.
            self.skipped(heal, i).await;
            return;
        }
        let healed = step(self.recorder, heal, Some(i), async {
            match kind {
                FaultKind::StopInstance => {
                    instance.resume().await.map(|()| String::from("SIGCONT"))
                }
                _ => restart(&mut instance, spec, 0).await,
            }
        })
        .await;
        if healed && instance.running() && !instance.stopped {
            self.world.mark_serving(i, instance.addr());
        }
    }

    /// Records a step that was not carried out because no other instance served.
    async fn skipped(&self, what: FaultWhat, i: usize) {
        let now = self.recorder.now_ms();
        self.recorder
            .record(Entry::Fault(FaultEvent {
                kind: FaultTag::Fault,
                what,
                instance: Some(i),
                start_ms: now,
                end_ms: now,
                ok: false,
                detail: format!("skipped: no other instance served for {CLAIM_WAIT:?}"),
            }))
            .await;
    }
}

/// Stops an instance gracefully and starts it again with `latency_ms` of payment latency.
async fn restart(
    instance: &mut Instance,
    spec: &super::procs::ServerSpec,
    latency_ms: u64,
) -> anyhow::Result<String> {
    instance.terminate(TERMINATE_GRACE).await;
    instance
        .start(spec, latency_ms, Instant::now() + RESTART_TIMEOUT)
        .await
}
