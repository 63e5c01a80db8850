// Types of daemon.mjs, for the TypeScript tests (test/ts).
export declare const ROOT: string;
export declare const BIN: string;
export declare const TESTVMM: string;
export declare const ASSETS: string;
export declare function missing(ok: boolean, what: string): string | undefined;
export declare class Daemon {
  static start(args?: string[]): Promise<Daemon>;
  readonly dir: string;
  url: string;
  key: string;
  log(): string;
  stop(): Promise<void>;
}
