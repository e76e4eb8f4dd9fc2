//! Pods bound to the node run as real runc containers (root and runc needed): status as a
//! kubelet writes it, and graceful deletion (SIGTERM, grace, SIGKILL, zero-grace DELETE).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{
    NODE_IP, TestNode, create_pod, delete_pod, eventually, shell_pod, skip_privileged,
    with_work_dir,
};
use k8s_openapi::api::core::v1::Pod;

const NS: &str = "ml";

fn pod(name: &str, script: &str, restart_policy: &str) -> Pod {
    let mut pod = shell_pod(NS, name, "docker.io/library/debian:12", script);
    pod.spec.as_mut().unwrap().restart_policy = Some(restart_policy.into());
    pod
}

fn stored(cluster: &automigrate_kube_fake::FakeCluster, name: &str) -> Option<Pod> {
    cluster.get(Some(NS), name)
}

/// The pod's phase, as the kubelet last wrote it.
fn phase(cluster: &automigrate_kube_fake::FakeCluster, name: &str) -> Option<String> {
    stored(cluster, name)?.status?.phase
}

/// Whether the pod's `main` container is running, as the kubelet last wrote it.
fn main_running(cluster: &automigrate_kube_fake::FakeCluster, name: &str) -> bool {
    stored(cluster, name)
        .and_then(|p| main_status(&p))
        .is_some_and(|s| s.state.is_some_and(|s| s.running.is_some()))
}

/// Waits for the kubelet to have removed the pod (its confirming DELETE done).
async fn removed(cluster: &automigrate_kube_fake::FakeCluster, name: &str) {
    eventually("the pod removed", || stored(cluster, name).is_none()).await;
}

fn main_status(pod: &Pod) -> Option<k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == "main")
        .cloned()
}

fn condition(pod: &Pod, kind: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

/// The exit code of `main` in the last status the kubelet wrote before removing the pod.
fn last_reported_exit_code(cluster: &automigrate_kube_fake::FakeCluster, name: &str) -> i64 {
    let path = format!("/api/v1/namespaces/{NS}/pods/{name}/status");
    let body = cluster
        .requests()
        .into_iter()
        .filter(|r| r.method == http::Method::PATCH && r.path == path)
        .filter_map(|r| r.body)
        .next_back()
        .expect("a status patch");
    body["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"]
        .as_i64()
        .unwrap_or_else(|| panic!("last status has no terminated state: {body}"))
}

/// The zero-grace DELETE the kubelet confirms a stopped pod with, preconditioned on its uid.
fn confirming_delete(cluster: &automigrate_kube_fake::FakeCluster, name: &str, uid: &str) -> bool {
    let path = format!("/api/v1/namespaces/{NS}/pods/{name}");
    cluster.requests().into_iter().any(|r| {
        r.method == http::Method::DELETE
            && r.path == path
            && r.body
                .as_ref()
                .is_some_and(|b| b["gracePeriodSeconds"] == 0 && b["preconditions"]["uid"] == uid)
    })
}

#[tokio::test]
async fn a_pod_runs_and_graceful_deletion_escalates_to_sigkill() {
    if skip_privileged("a_pod_runs_and_graceful_deletion_escalates_to_sigkill") {
        return;
    }
    let (node, kubelet) = TestNode::start().await;
    let pods = node.pods(NS);
    let created = create_pod(&pods, &pod("sleeper", "sleep 1000", "Always")).await;
    let uid = created.metadata.uid.clone().unwrap();

    eventually("the pod Running and Ready", || {
        stored(&node.cluster, "sleeper").is_some_and(|p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && condition(&p, "Ready").as_deref() == Some("True")
        })
    })
    .await;
    let running = stored(&node.cluster, "sleeper").unwrap();
    let status = running.status.clone().unwrap();
    assert_eq!(status.host_ip.as_deref(), Some(NODE_IP));
    assert!(status.start_time.is_some());
    assert_eq!(condition(&running, "PodScheduled").as_deref(), Some("True"));
    assert_eq!(
        condition(&running, "ContainersReady").as_deref(),
        Some("True")
    );
    let main = main_status(&running).unwrap();
    assert!(main.ready);
    assert_eq!(main.restart_count, 0);
    assert!(main.state.unwrap().running.unwrap().started_at.is_some());
    let id = main
        .container_id
        .unwrap()
        .strip_prefix("runc://")
        .unwrap()
        .to_string();
    // Really running, as runc sees it.
    assert_eq!(
        node.guard.containers(),
        [(id.clone(), "running".to_string())]
    );
    assert_eq!(
        kubelet
            .registry()
            .get(&automigrate_kubelet::pods::ContainerKey {
                namespace: NS.into(),
                pod: "sleeper".into(),
                container: "main".into(),
            }),
        Some(id)
    );

    // `sh` as the container's init ignores SIGTERM: the grace period runs out and SIGKILL
    // ends it (137), then the kubelet removes the pod.
    delete_pod(&pods, "sleeper", 1).await;
    removed(&node.cluster, "sleeper").await;
    assert!(
        node.guard.containers().is_empty(),
        "{:?}",
        node.guard.containers()
    );
    assert_eq!(last_reported_exit_code(&node.cluster, "sleeper"), 137);
    assert!(confirming_delete(&node.cluster, "sleeper", &uid));
    assert!(!node.root.path().join("pods").join(&uid).exists());
    kubelet.shutdown().await.unwrap();
}

#[tokio::test]
async fn sigterm_comes_first_and_a_container_that_honours_it_exits_cleanly() {
    if skip_privileged("sigterm_comes_first_and_a_container_that_honours_it_exits_cleanly") {
        return;
    }
    let (node, kubelet) = TestNode::start().await;
    let pods = node.pods(NS);
    let script = "trap 'exit 0' TERM; while :; do sleep 0.1; done";
    let created = create_pod(&pods, &pod("polite", script, "Always")).await;
    let uid = created.metadata.uid.clone().unwrap();
    eventually("the pod Running", || main_running(&node.cluster, "polite")).await;
    // A long grace period: only SIGTERM can end it before the test's wait runs out.
    delete_pod(&pods, "polite", 600).await;
    removed(&node.cluster, "polite").await;
    assert_eq!(last_reported_exit_code(&node.cluster, "polite"), 0);
    assert!(confirming_delete(&node.cluster, "polite", &uid));
    assert!(node.guard.containers().is_empty());
    kubelet.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_container_that_fails_under_restart_policy_never_fails_the_pod() {
    if skip_privileged("a_container_that_fails_under_restart_policy_never_fails_the_pod") {
        return;
    }
    let (node, kubelet) = TestNode::start().await;
    let pods = node.pods(NS);
    create_pod(&pods, &pod("crasher", "exit 3", "Never")).await;
    eventually("the pod Failed", || {
        phase(&node.cluster, "crasher").as_deref() == Some("Failed")
    })
    .await;
    let main = main_status(&stored(&node.cluster, "crasher").unwrap()).unwrap();
    let terminated = main.state.unwrap().terminated.unwrap();
    assert_eq!(terminated.exit_code, 3);
    assert_eq!(terminated.reason.as_deref(), Some("Error"));
    assert!(!main.ready);
    kubelet.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_crashing_container_under_restart_policy_always_is_restarted() {
    if skip_privileged("a_crashing_container_under_restart_policy_always_is_restarted") {
        return;
    }
    let (node, kubelet) = TestNode::start().await;
    let pods = node.pods(NS);
    create_pod(&pods, &pod("flaky", "exit 7", "Always")).await;
    eventually("two restarts", || {
        stored(&node.cluster, "flaky")
            .and_then(|p| main_status(&p))
            .is_some_and(|s| s.restart_count >= 2)
    })
    .await;
    let pod = stored(&node.cluster, "flaky").unwrap();
    assert_eq!(
        pod.status.clone().unwrap().phase.as_deref(),
        Some("Running")
    );
    let last = main_status(&pod)
        .unwrap()
        .last_state
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(last.exit_code, 7);
    kubelet.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restarted_kubelet_adopts_the_running_containers_instead_of_starting_copies() {
    if skip_privileged(
        "a_restarted_kubelet_adopts_the_running_containers_instead_of_starting_copies",
    ) {
        return;
    }
    let (node, kubelet) = TestNode::start().await;
    let pods = node.pods(NS);
    create_pod(&pods, &pod("long", "sleep 1000", "Always")).await;
    eventually("the pod Running", || main_running(&node.cluster, "long")).await;
    let first = main_status(&stored(&node.cluster, "long").unwrap()).unwrap();
    // The kubelet goes away; its container keeps running, as under CRI-O.
    kubelet.shutdown().await.unwrap();
    assert_eq!(node.guard.containers().len(), 1);

    node.cluster.clear_requests();
    let kubelet = node.start_kubelet().await;
    // The new kubelet writes its view of the pod: the same container, running, not restarted.
    eventually("the new kubelet's pod status", || {
        node.cluster.requests().iter().any(|r| {
            r.method == http::Method::PATCH
                && r.path == format!("/api/v1/namespaces/{NS}/pods/long/status")
        })
    })
    .await;
    let after = main_status(&stored(&node.cluster, "long").unwrap()).unwrap();
    assert_eq!(after.container_id, first.container_id);
    assert!(after.state.unwrap().running.is_some());
    assert_eq!(after.restart_count, 0);
    assert_eq!(
        node.guard.containers().len(),
        1,
        "{:?}",
        node.guard.containers()
    );

    // Its exit code still reaches the status, though this kubelet is not runc's parent.
    delete_pod(&pods, "long", 1).await;
    removed(&node.cluster, "long").await;
    assert_eq!(last_reported_exit_code(&node.cluster, "long"), 137);
    assert!(node.guard.containers().is_empty());
    kubelet.shutdown().await.unwrap();
}

/// A completed pod stays completed: a kubelet restarted after the pod ended must not run its
/// containers again (nor write its phase back to Pending).
#[tokio::test]
async fn a_restarted_kubelet_does_not_run_a_finished_pod_again() {
    if skip_privileged("a_restarted_kubelet_does_not_run_a_finished_pod_again") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (node, kubelet) = TestNode::start().await;
    let pods = node.pods(NS);
    let finished = with_work_dir(
        pod("finished", "echo run >> /work/runs; exit 3", "Never"),
        work.path(),
    );
    create_pod(&pods, &finished).await;
    eventually("the pod Failed", || {
        phase(&node.cluster, "finished").as_deref() == Some("Failed")
    })
    .await;
    let before = stored(&node.cluster, "finished").unwrap().status.unwrap();
    // It ran once: a container that ends before the kubelet sees it running has still run (it
    // was taken for a failed start and run again, restartPolicy or not).
    let runs = std::fs::read_to_string(work.path().join("runs")).unwrap();
    assert_eq!(runs.lines().count(), 1, "ran more than once: {runs:?}");
    kubelet.shutdown().await.unwrap();

    let kubelet = node.start_kubelet().await;
    // A pod created after the restart runs: by then the new kubelet has seen both pods (the
    // finished one came in its initial list).
    create_pod(&pods, &pod("after", "sleep 1000", "Never")).await;
    eventually("the new pod Running", || {
        phase(&node.cluster, "after").as_deref() == Some("Running")
    })
    .await;
    let runs = std::fs::read_to_string(work.path().join("runs")).unwrap();
    assert_eq!(
        runs.lines().count(),
        1,
        "ran again after the restart: {runs:?}"
    );
    let after = stored(&node.cluster, "finished").unwrap().status.unwrap();
    assert_eq!(after.phase.as_deref(), Some("Failed"));
    assert_eq!(after.start_time, before.start_time);
    assert_eq!(
        after.container_statuses.unwrap()[0]
            .state
            .clone()
            .unwrap()
            .terminated
            .unwrap()
            .exit_code,
        3
    );
    kubelet.shutdown().await.unwrap();
}

/// A container runc cannot start is a failed start (waiting, RunContainerError, runc's reason),
/// not a container that ran and exited.
#[tokio::test]
async fn a_container_runc_cannot_start_waits_with_run_container_error() {
    if skip_privileged("a_container_runc_cannot_start_waits_with_run_container_error") {
        return;
    }
    let (node, kubelet) = TestNode::start().await;
    let pods = node.pods(NS);
    let mut broken = pod("broken", "", "Never");
    broken.spec.as_mut().unwrap().containers[0].command = Some(vec!["/nonexistent/program".into()]);
    create_pod(&pods, &broken).await;
    eventually("RunContainerError", || {
        stored(&node.cluster, "broken")
            .and_then(|p| main_status(&p))
            .and_then(|s| s.state?.waiting?.reason)
            .as_deref()
            == Some("RunContainerError")
    })
    .await;
    let pod = stored(&node.cluster, "broken").unwrap();
    let waiting = main_status(&pod).unwrap().state.unwrap().waiting.unwrap();
    assert!(
        waiting
            .message
            .as_deref()
            .unwrap()
            .contains("/nonexistent/program"),
        "{waiting:?}"
    );
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Pending"));
    assert!(node.guard.containers().is_empty());
    kubelet.shutdown().await.unwrap();
}

/// The API server refusing writes for a while (an outage, a partition that heals) delays the
/// kubelet's pod status and its confirming DELETE; it does not lose them.
#[tokio::test]
async fn status_and_the_confirming_delete_are_retried_after_api_errors() {
    if skip_privileged("status_and_the_confirming_delete_are_retried_after_api_errors") {
        return;
    }
    let (node, kubelet) = TestNode::start().await;
    let pods = node.pods(NS);
    let status_path = format!("/api/v1/namespaces/{NS}/pods/flaky-api/status");
    node.cluster.inject_fault(
        automigrate_kube_fake::Fault::status(503)
            .on(http::Method::PATCH, &status_path)
            .times(3),
    );
    create_pod(&pods, &pod("flaky-api", "sleep 1000", "Never")).await;
    eventually("the pod Running despite refused status writes", || {
        phase(&node.cluster, "flaky-api").as_deref() == Some("Running")
    })
    .await;

    delete_pod(&pods, "flaky-api", 1).await;
    // Injected before the kubelet's confirmation can come: `sh` as init ignores SIGTERM, so the
    // container ends only when the 1 s grace period is over. The final status write is refused
    // too: kube-fake removes a terminating pod on any write to it (a real API server waits for
    // the zero-grace DELETE), so only the DELETE may remove it here.
    node.cluster.inject_fault(
        automigrate_kube_fake::Fault::status(503)
            .on(http::Method::PATCH, &status_path)
            .times(1),
    );
    node.cluster.inject_fault(
        automigrate_kube_fake::Fault::status(503)
            .on(
                http::Method::DELETE,
                &format!("/api/v1/namespaces/{NS}/pods/flaky-api"),
            )
            .times(3),
    );
    eventually("the pod removed despite refused DELETEs", || {
        stored(&node.cluster, "flaky-api").is_none()
    })
    .await;
    assert!(node.guard.containers().is_empty());
    kubelet.shutdown().await.unwrap();
}
