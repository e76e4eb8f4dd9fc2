//! The HTTP face: a `tower::Service` that routes kube-client requests to the store.
//!
//! Owns [`FakeService`] (what `kube::Client::new` wraps) and the request pipeline: collect the
//! body, record the request, apply an injected fault if one matches, parse the path
//! ([`crate::path`]), run the verb against the [`crate::store::Store`] under the cluster lock,
//! and answer with JSON (objects, lists, `Status` errors) or, for watches, a streaming body.
//! Lists and watch replays collect `Arc`s under the lock and serialize after releasing it, so a
//! 50,000-object list does not hold up writers while it is encoded.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::error::{ApiError, success_status};
use crate::fault::{FaultEffect, InjectedUnreachable, take_matching};
use crate::path::{ResourceType, Target};
use crate::proxy::NodeProxyRequest;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Deletion, Update};
use crate::table::{Include, TableSpec};
use crate::watch::{
    Filter, Rendering, ResponseBody, WatchStart, bookmark_line, error_line, event_line,
    stream_body, translate,
};
use crate::{FakeCluster, RecordedRequest};

/// Boxed error of the service (only transport-level faults produce one).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a watch lasts when the client gives no `timeoutSeconds` (kube always does).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// The in-process API server as a `tower::Service`; [`FakeCluster::client`] wraps it in a
/// `kube::Client`. Cloning is cheap (it shares the cluster).
#[derive(Clone, Debug)]
pub struct FakeService {
    pub(crate) cluster: FakeCluster,
}

impl tower::Service<Request<kube::client::Body>> for FakeService {
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<kube::client::Body>) -> Self::Future {
        let cluster = self.cluster.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| Box::new(e) as BoxError)?
                .to_bytes();
            cluster.handle(&parts, body)
        })
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<ResponseBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn value_response(status: StatusCode, value: &Value) -> Response<ResponseBody> {
    json_response(status, serde_json::to_vec(value).unwrap_or_default())
}

fn error_response(error: &ApiError) -> Response<ResponseBody> {
    let status = StatusCode::from_u16(error.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    tracing::debug!(code = error.code(), reason = error.reason(), %error, "answering with an error Status");
    value_response(status, &error.to_status())
}

/// Decodes `application/x-www-form-urlencoded` query pairs.
fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn filter_from(
    query: &BTreeMap<String, String>,
    resource: &ResourceType,
    namespace: Option<String>,
) -> Result<Filter, ApiError> {
    Ok(Filter {
        namespace,
        labels: match query.get("labelSelector") {
            Some(text) => LabelSelector::parse(text)?,
            None => LabelSelector::default(),
        },
        fields: match query.get("fieldSelector") {
            Some(text) => FieldSelector::parse(text, resource)?,
            None => FieldSelector::default(),
        },
    })
}

fn list_body(
    rendering: &Rendering,
    kind: &str,
    api_version: &str,
    rv: u64,
    items: &[Arc<Value>],
) -> Vec<u8> {
    let (list_kind, list_api_version) = match rendering {
        Rendering::Table(spec) => {
            let table = spec.table(items.iter().map(|i| &**i), Some(rv), jiff::Timestamp::now());
            return serde_json::to_vec(&table).unwrap_or_default();
        }
        Rendering::Full => (format!("{kind}List"), api_version.to_owned()),
        Rendering::MetadataOnly => (
            "PartialObjectMetadataList".to_owned(),
            "meta.k8s.io/v1".to_owned(),
        ),
    };
    let head = json!({ "apiVersion": list_api_version, "kind": list_kind, "metadata": { "resourceVersion": rv.to_string() } });
    let mut out = serde_json::to_vec(&head).unwrap_or_default();
    // Reopen the head object to append the items array without building one big Value.
    out.pop();
    out.extend_from_slice(b",\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        if serde_json::to_writer(&mut out, &*rendering.render(item)).is_err() {
            out.extend_from_slice(b"null");
        }
    }
    out.extend_from_slice(b"]}");
    out
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-kube-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

impl FakeCluster {
    /// Serves one request (the whole pipeline after the body is collected).
    pub(crate) fn handle(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
    ) -> Result<Response<ResponseBody>, BoxError> {
        let path = parts.uri.path().to_owned();
        let raw_query = parts.uri.query().unwrap_or_default().to_owned();
        let query = parse_query(&raw_query);
        let is_watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        let body_json: Option<Value> = if body.is_empty() {
            None
        } else {
            serde_json::from_slice(&body).ok()
        };
        let span = tracing::debug_span!("kube_fake_request", method = %parts.method, path = %path, watch = is_watch);
        let _entered = span.enter();

        {
            let mut state = self.lock();
            if state.record_requests {
                state.requests.push(RecordedRequest {
                    method: parts.method.clone(),
                    path: path.clone(),
                    query: raw_query.clone(),
                    body: body_json.clone(),
                });
            }
            match take_matching(&mut state.faults, &parts.method, &path, is_watch) {
                Some(FaultEffect::Unreachable) => {
                    tracing::debug!("injected fault: unreachable");
                    return Err(Box::new(InjectedUnreachable));
                }
                Some(FaultEffect::Status {
                    code,
                    reason,
                    message,
                }) => {
                    return Ok(error_response(&ApiError::Injected {
                        code,
                        reason,
                        message,
                    }));
                }
                None => {}
            }
        }

        let accept = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|a| a.to_str().ok())
            .unwrap_or_default();
        let dry_run = query.get("dryRun").is_some_and(|d| d == "All");
        let Some(target) = crate::path::parse(&path) else {
            if parts.method == Method::GET
                && let Some(document) = crate::discovery::document(&self.lock().store, &path)
            {
                return Ok(value_response(StatusCode::OK, &document));
            }
            return Ok(error_response(&ApiError::NotFound {
                resource: String::new(),
                group: String::new(),
                name: path,
            }));
        };
        let rendering = match &target {
            // kubectl get: server-side printing, for objects and collections (not subresources).
            Target::Collection { resource, .. }
            | Target::Object {
                resource,
                subresource: None,
                ..
            } if accept.contains("as=Table") => {
                let advertised = crate::discovery::find(&self.lock().store, resource);
                Rendering::Table(TableSpec::for_resource(
                    resource,
                    advertised.as_ref(),
                    Include::from_query(query.get("includeObject").map(String::as_str)),
                ))
            }
            _ if accept.contains("as=PartialObjectMetadata") => Rendering::MetadataOnly,
            _ => Rendering::Full,
        };
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|c| c.to_str().ok())
            .unwrap_or_default()
            .to_owned();

        let request = RequestContext {
            method: parts.method.clone(),
            query,
            raw_query,
            body,
            body_json,
            content_type,
            rendering,
            dry_run,
            is_watch,
        };
        Ok(match self.route(target, &request) {
            Ok(response) => response,
            Err(error) => error_response(&error),
        })
    }

    fn route(
        &self,
        target: Target,
        request: &RequestContext,
    ) -> Result<Response<ResponseBody>, ApiError> {
        match target {
            Target::Version => match request.method {
                Method::GET => Ok(value_response(StatusCode::OK, &version_info())),
                _ => Err(ApiError::MethodNotAllowed),
            },
            Target::NodeProxy { node, path } => self.node_proxy(node, path, request),
            Target::Collection {
                resource,
                namespace,
            } => match request.method {
                Method::GET if request.is_watch => self.watch(&resource, namespace, request),
                Method::GET => self.list_response(&resource, namespace, request),
                Method::POST => {
                    let body = request.require_body()?;
                    let object = self.lock().store.create(
                        &resource,
                        namespace.as_deref(),
                        body,
                        request.dry_run,
                    )?;
                    Ok(value_response(
                        StatusCode::CREATED,
                        &request.rendering.render(&object),
                    ))
                }
                Method::DELETE => self.delete_collection(&resource, namespace, request),
                _ => Err(ApiError::MethodNotAllowed),
            },
            Target::Object {
                resource,
                namespace,
                name,
                subresource,
            } => self.object(
                &resource,
                namespace.as_deref(),
                &name,
                subresource.as_deref(),
                request,
            ),
        }
    }

    fn object(
        &self,
        resource: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        request: &RequestContext,
    ) -> Result<Response<ResponseBody>, ApiError> {
        let not_found = || ApiError::NotFound {
            resource: format!("{}/{}", resource.plural, subresource.unwrap_or_default()),
            group: resource.group.clone(),
            name: name.to_owned(),
        };
        let status_only = match subresource {
            None => false,
            Some("status") if resource.has_status_subresource() => true,
            Some("eviction") if resource.group.is_empty() && resource.plural == "pods" => {
                return self.evict(resource, namespace, name, request);
            }
            Some(_) => return Err(not_found()),
        };
        let render =
            |object: &Value| value_response(StatusCode::OK, &request.rendering.render(object));
        match request.method {
            Method::GET => {
                let object = self.lock().store.get(resource, namespace, name)?;
                Ok(render(&object))
            }
            Method::PUT => {
                let body = request.require_body()?;
                let object = self.lock().store.update(
                    resource,
                    namespace,
                    name,
                    Update::Replace(body),
                    status_only,
                    request.dry_run,
                )?;
                Ok(render(&object))
            }
            Method::PATCH => {
                let body = request.require_body()?;
                let media = request
                    .content_type
                    .split(';')
                    .next()
                    .unwrap_or_default()
                    .trim();
                let update = match media {
                    "application/merge-patch+json" => Update::Merge(body),
                    // Strategic merge is approximated by a JSON merge patch: list merge keys are
                    // not known to a schema-less server, so lists are replaced whole. A patch
                    // with directives (`kubectl apply` changing a list sends
                    // `$setElementOrder/...` and only the changed fields of each element) would
                    // replace a list by those partial elements: refused instead of corrupting.
                    "application/strategic-merge-patch+json" => match directive(&body) {
                        Some(key) => {
                            return Err(ApiError::Invalid {
                                resource: resource.plural.clone(),
                                group: resource.group.clone(),
                                name: name.to_owned(),
                                message: format!(
                                    "strategic merge patch directive {key:?} is not supported by this API server (it merges lists whole); use kubectl replace, or delete and re-create the object"
                                ),
                            });
                        }
                        None => Update::Merge(body),
                    },
                    "application/json-patch+json" => Update::Json(body),
                    "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                        Update::Apply(body)
                    }
                    other => {
                        return Err(ApiError::Injected {
                            code: 415,
                            reason: "UnsupportedMediaType".into(),
                            message: format!(
                                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
                            ),
                        });
                    }
                };
                let object = self.lock().store.update(
                    resource,
                    namespace,
                    name,
                    update,
                    status_only,
                    request.dry_run,
                )?;
                Ok(render(&object))
            }
            Method::DELETE if !status_only => {
                let options = request.body_json.clone().unwrap_or_else(|| json!({}));
                let outcome = self.lock().store.delete(
                    resource,
                    namespace,
                    name,
                    &options,
                    request.dry_run,
                )?;
                Ok(match outcome {
                    Deletion::Pending(object) => render(&object),
                    Deletion::Removed(object) if resource.returns_deleted_object() => {
                        render(&object)
                    }
                    Deletion::Removed(object) => {
                        let uid = object
                            .pointer("/metadata/uid")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        value_response(
                            StatusCode::OK,
                            &success_status(&resource.plural, &resource.group, name, uid),
                        )
                    }
                })
            }
            _ => Err(ApiError::MethodNotAllowed),
        }
    }

    /// `POST pods/{name}/eviction`: deletes the pod (PodDisruptionBudgets are not evaluated).
    fn evict(
        &self,
        resource: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        request: &RequestContext,
    ) -> Result<Response<ResponseBody>, ApiError> {
        if request.method != Method::POST {
            return Err(ApiError::MethodNotAllowed);
        }
        let options = request
            .body_json
            .as_ref()
            .and_then(|b| b.get("deleteOptions"))
            .cloned()
            .unwrap_or_else(|| json!({}));
        self.lock()
            .store
            .delete(resource, namespace, name, &options, request.dry_run)?;
        Ok(value_response(
            StatusCode::CREATED,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
        ))
    }

    fn list_response(
        &self,
        resource: &ResourceType,
        namespace: Option<String>,
        request: &RequestContext,
    ) -> Result<Response<ResponseBody>, ApiError> {
        let filter = filter_from(&request.query, resource, namespace)?;
        let (mut items, rv, kind) = {
            let state = self.lock();
            let items = state.store.list(resource, &filter);
            (
                items,
                state.store.resource_version,
                state.store.kind_of(resource),
            )
        };
        if crate::events::is_core_events(resource) {
            // One Event storage on a real server: see `crate::events`.
            let unfiltered = crate::watch::Filter {
                namespace: filter.namespace.clone(),
                ..Default::default()
            };
            let newer = self
                .lock()
                .store
                .list(&crate::events::events_v1(), &unfiltered);
            for event in newer {
                let core = crate::events::to_core(&event);
                let namespace = core
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if filter.matches(namespace, &core) {
                    items.push(Arc::new(core));
                }
            }
        }
        let body = list_body(
            &request.rendering,
            &kind,
            &resource.api_version(),
            rv,
            &items,
        );
        Ok(json_response(StatusCode::OK, body))
    }

    fn delete_collection(
        &self,
        resource: &ResourceType,
        namespace: Option<String>,
        request: &RequestContext,
    ) -> Result<Response<ResponseBody>, ApiError> {
        let filter = filter_from(&request.query, resource, namespace)?;
        let options = request.body_json.clone().unwrap_or_else(|| json!({}));
        let (deleted, rv, kind) = {
            let mut state = self.lock();
            let matching = state.store.list(resource, &filter);
            let mut deleted = Vec::with_capacity(matching.len());
            for object in matching {
                let ns = object
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str);
                let name = object
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                match state
                    .store
                    .delete(resource, ns, name, &options, request.dry_run)
                {
                    Ok(Deletion::Pending(o) | Deletion::Removed(o)) => deleted.push(o),
                    Err(error) => {
                        tracing::debug!(%error, name, "deletecollection skipped an object")
                    }
                }
            }
            (
                deleted,
                state.store.resource_version,
                state.store.kind_of(resource),
            )
        };
        Ok(json_response(
            StatusCode::OK,
            list_body(
                &request.rendering,
                &kind,
                &resource.api_version(),
                rv,
                &deleted,
            ),
        ))
    }

    fn watch(
        &self,
        resource: &ResourceType,
        namespace: Option<String>,
        request: &RequestContext,
    ) -> Result<Response<ResponseBody>, ApiError> {
        let filter = filter_from(&request.query, resource, namespace)?;
        let query = &request.query;
        let bookmarks = query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true");
        let send_initial = query.get("sendInitialEvents").is_some_and(|b| b == "true");
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
        let from =
            match query.get("resourceVersion").map(String::as_str) {
                None | Some("" | "0") => None,
                Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
                    ApiError::BadRequest(format!("invalid resource version: {rv:?}"))
                })?),
            };

        enum Opening {
            State(Vec<Arc<Value>>),
            Replay(Vec<(&'static str, Arc<Value>)>),
            Expired(ApiError),
        }
        let (opening, receiver, current, kind) = {
            let mut state = self.lock();
            let current = state.store.resource_version;
            let store = state.store.type_store(resource);
            let kind = store.kind.clone();
            let receiver = store.subscribe();
            let opening = match from {
                // No version, "0", or a streaming list: the current state as ADDED events.
                _ if send_initial || from.is_none() => Opening::State(
                    store
                        .scoped(filter.namespace.as_deref())
                        .filter(|((ns, _), object)| filter.matches(ns, object))
                        .map(|(_, object)| object.clone())
                        .collect(),
                ),
                Some(rv) if rv < store.compacted_through => Opening::Expired(ApiError::Expired {
                    requested: rv,
                    oldest: store.compacted_through,
                }),
                Some(rv) => Opening::Replay(
                    store
                        .history
                        .iter()
                        .filter(|change| change.rv > rv)
                        .filter_map(|change| translate(change, &filter))
                        .collect(),
                ),
                None => Opening::State(Vec::new()),
            };
            (opening, receiver, current, kind)
        };

        let api_version = resource.api_version();
        let mut initial = VecDeque::new();
        let receiver = match opening {
            Opening::State(objects) => {
                for object in &objects {
                    initial.push_back(event_line("ADDED", &request.rendering.render(object)));
                }
                if send_initial {
                    initial.push_back(bookmark_line(&kind, &api_version, current, true));
                }
                Some(receiver)
            }
            Opening::Replay(events) => {
                for (event_type, object) in &events {
                    initial.push_back(event_line(event_type, &request.rendering.render(object)));
                }
                Some(receiver)
            }
            Opening::Expired(error) => {
                tracing::debug!(%error, "watch from a compacted resourceVersion");
                initial.push_back(error_line(&error));
                None
            }
        };
        let body = stream_body(WatchStart {
            initial,
            receiver,
            filter,
            rendering: request.rendering.clone(),
            bookmarks,
            timeout,
            start_rv: current.max(from.unwrap_or_default()),
            kind,
            api_version,
        });
        let mut response = Response::new(body);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(response)
    }

    fn node_proxy(
        &self,
        node: String,
        path: String,
        request: &RequestContext,
    ) -> Result<Response<ResponseBody>, ApiError> {
        let handler = self.lock().proxy_handlers.get(&node).cloned();
        let Some(handler) = handler else {
            return Err(ApiError::NotFound {
                resource: "nodes/proxy".into(),
                group: String::new(),
                name: node,
            });
        };
        let answer = (handler.0)(&NodeProxyRequest {
            method: request.method.clone(),
            node,
            path,
            query: request.raw_query.clone(),
            body: request.body.clone(),
        });
        let mut response = Response::new(Full::new(answer.body).boxed_unsync());
        *response.status_mut() = answer.status;
        if let Ok(value) = HeaderValue::from_str(&answer.content_type) {
            response.headers_mut().insert(header::CONTENT_TYPE, value);
        }
        Ok(response)
    }
}

/// The first strategic-merge-patch directive key (`$patch`, `$setElementOrder/...`,
/// `$retainKeys`, `$deleteFromPrimitiveList/...`) anywhere in `patch`.
fn directive(patch: &Value) -> Option<String> {
    match patch {
        Value::Object(map) => map.iter().find_map(|(key, value)| {
            if key.starts_with('$') {
                Some(key.clone())
            } else {
                directive(value)
            }
        }),
        Value::Array(items) => items.iter().find_map(directive),
        _ => None,
    }
}

/// One parsed request, as the verb handlers need it.
struct RequestContext {
    method: Method,
    query: BTreeMap<String, String>,
    raw_query: String,
    body: Bytes,
    body_json: Option<Value>,
    content_type: String,
    rendering: Rendering,
    dry_run: bool,
    is_watch: bool,
}

impl RequestContext {
    fn require_body(&self) -> Result<Value, ApiError> {
        match &self.body_json {
            Some(value) => Ok(value.clone()),
            None if self.body.is_empty() => Err(ApiError::BadRequest("the request needs a body".into())),
            None => Err(ApiError::BadRequest(
                "the request body is not JSON (YAML apply patches are not supported; kube sends JSON)".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q =
            parse_query("labelSelector=app%3Dtrain%2Ctier+in+%28a%2Cb%29&watch=true&x=%zz&y=%4");
        assert_eq!(q.get("labelSelector").unwrap(), "app=train,tier in (a,b)");
        assert_eq!(q.get("watch").unwrap(), "true");
        assert_eq!(q.get("x").unwrap(), "%zz");
        assert_eq!(q.get("y").unwrap(), "%4");
    }
}
