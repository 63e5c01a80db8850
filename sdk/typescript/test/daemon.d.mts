// Types of daemon.mjs, for the TypeScript tests (test/ts).
import type { TestContext } from "node:test";
export declare const ROOT: string;
export declare const BIN: string;
export declare const TESTVMM: string;
export declare const ASSETS: string;
export declare function presentOrSkip(t: TestContext, ok: boolean, what: string): boolean;
export declare class Daemon {
  static start(args?: string[]): Promise<Daemon>;
  readonly dir: string;
  url: string;
  key: string;
  log(): string;
  stop(): Promise<void>;
}
