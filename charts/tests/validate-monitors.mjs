// Reads a JSON array of rendered objects on stdin; validates every PodMonitor,
// ServiceMonitor and PrometheusRule with @kubernetes-models/prometheus-operator, and
// every ScaledObject (the docs' autoscaling example) with @kubernetes-models/keda.
// Prints one line per object checked; exits 1 on the first invalid one.
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";

const kinds = { PodMonitor, ServiceMonitor, PrometheusRule, ScaledObject };
let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = false;
let checked = 0;
for (const obj of JSON.parse(input)) {
  const Model = kinds[obj.kind];
  if (!Model) continue;
  try {
    new Model(obj).validate();
    console.log(`valid ${obj.kind}/${obj.metadata.name}`);
    checked++;
  } catch (e) {
    console.log(`INVALID ${obj.kind}/${obj.metadata.name}: ${e.message}`);
    failed = true;
  }
}
console.log(`checked ${checked}`);
process.exit(failed ? 1 : 0);
