// The type docs/grafana-dashboard.json must have: Grafana's classic (v1) dashboard model from
// @grafana/schema, with each panel narrowed by its `type` to that panel plugin's published options and
// field config, and each query to the Prometheus query model (@grafana/grafana-foundation-sdk, the only
// package that publishes it). test_grafana_schema.py assigns the JSON to a const of this type as an object
// literal, so strings keep their literal types and unknown keys are excess properties.
import type { Dashboard, FieldConfig, FieldConfigSource, Panel, RowPanel } from '@grafana/schema';
import type * as timeseries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';
import type * as stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as bargauge from '@grafana/schema/dist/esm/raw/composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen';
import type * as table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type { dataquery as PrometheusQuery } from '@grafana/grafana-foundation-sdk/prometheus';

// Grafana's types spell option values as TypeScript enums, which a string in JSON never is; the JSON holds
// their values. So every string enum becomes the union of its values ("list" | "table" | ...), and nothing
// else changes: object keys, optionality and number enums stay as published.
type Plain<T> = T extends string
  ? `${T}`
  : T extends readonly (infer U)[]
    ? Plain<U>[]
    : T extends object
      ? { [K in keyof T]: Plain<T[K]> }
      : T;

// The SDK's marker method that ties a query type to its data source kind: no JSON has it.
type Query = Omit<PrometheusQuery, '_implementsDataqueryVariant'>;

// Stat and bar gauge publish no custom field config: Grafana's generic one stands.
type Typed<T extends string, Options, Custom = FieldConfig['custom']> = Omit<
  Panel,
  'type' | 'options' | 'fieldConfig' | 'targets'
> & {
  type: T;
  options?: Options;
  fieldConfig?: Omit<FieldConfigSource, 'defaults'> & { defaults: Omit<FieldConfig, 'custom'> & { custom?: Custom } };
  targets?: Query[];
};

export type KnownPanel =
  | Typed<'timeseries', timeseries.Options, timeseries.FieldConfig>
  | Typed<'stat', stat.Options>
  | Typed<'bargauge', bargauge.Options>
  | Typed<'table', table.Options, table.FieldConfig>;

// "Export for sharing externally" wraps a dashboard in these two keys, which the import form reads and
// strips (the data source to pick, the plugins needed); they are not part of the model itself.
interface ExportEnvelope {
  __inputs?: { name: string; label: string; description?: string; type: 'datasource'; pluginId: string; pluginName: string }[];
  __requires?: { type: 'grafana' | 'datasource' | 'panel'; id: string; name: string; version: string }[];
}

export type SkyferryDashboard = Plain<Omit<Dashboard, 'panels'> & ExportEnvelope & { panels: (KnownPanel | RowPanel)[] }>;
