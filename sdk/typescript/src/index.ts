/**
 * The Hyperfleet SDK for TypeScript and JavaScript (Node.js >= 20, ESM, no
 * runtime dependencies).
 *
 * ```ts
 * import { Hyperfleet } from "hyperfleet";
 * const hf = new Hyperfleet(); // HYPERFLEET_URL, HYPERFLEET_API_KEY
 * await using m = await hf.machines.create({ memSizeMib: 256 }, { start: true });
 * const r = await m.exec(["uname", "-a"]);
 * console.log(r.exitCode, r.stdout);
 * ```
 */
export { Hyperfleet, Quotas, DEFAULT_URL, DEFAULT_WAIT_ROUND, type HyperfleetOptions } from "./client.js";
export {
  Machine,
  Machines,
  MachineFiles,
  ExecStream,
  type ActionOptions,
  type Command,
  type CreateOptions,
  type DeleteOptions,
  type EventsOptions,
  type ExecChunk,
  type ExecExit,
  type ExecOptions,
  type Fork,
  type FileData,
  type ListOptions,
  type LogsOptions,
  type MachinePage,
  type PageOptions,
  type ReadOptions,
  type WaitOptions,
  type WriteOptions,
} from "./machines.js";
export { Keys } from "./keys.js";
export { Image, Images, ImageFailedError, type ArchiveData, type ImageEventsOptions, type WaitReadyOptions } from "./images.js";
export { Snapshots, Templates, type Ref } from "./snapshots.js";
export * from "./errors.js";
export type {
  ApiKey,
  CreateKeyRequest,
  CreateMachineRequest,
  CreateSnapshotRequest,
  CreateTemplateRequest,
  CreatedKey,
  DirEntry,
  ExecResult,
  FileStat,
  FileWritten,
  ForkRequest,
  Health,
  Image as ImageData,
  ImageEvent,
  ImageLayer,
  ImageRunConfig,
  ImageStatus,
  Machine as MachineData,
  MachineEvent,
  MachineNetwork,
  MachineOciImage,
  MachineProcess,
  MachineStatus,
  PullImageRequest,
  RegistryAuth,
  RestartPolicy,
  RestartPolicyKind,
  Quota,
  QuotaLimits,
  Scope,
  Snapshot,
  SnapshotStatus,
  StepTiming,
  Storage,
  StorageEviction,
  VmmKind,
  Persistence,
  PersistenceType,
  UpdateMachineRequest,
} from "./generated/openapi.js";
export { API_VERSION, IMAGE_STATUSES, MACHINE_STATUSES, SCOPES, SNAPSHOT_STATUSES, VMM_KINDS } from "./generated/openapi.js";
/** Every type of docs/openapi.json, generated (camelCase field names). */
export type * as api from "./generated/openapi.js";
