/**
 * A promise and the function that resolves it, for a test that holds one side of a race open
 * until it lets it go (Node 20 has no `Promise.withResolvers`).
 */
export interface Deferred<T> {
  promise: Promise<T>;
  resolve: (value: T) => void;
}

export function deferred<T = void>(): Deferred<T> {
  let resolve: (value: T) => void = () => {};
  const promise = new Promise<T>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}
