import { afterEach } from 'vitest';
import { cleanup } from '@testing-library/svelte';
import { clearMocks } from '@tauri-apps/api/mocks';

// Unmount first (components unlisten through the mocked IPC), then drop the mocks.
afterEach(() => {
  cleanup();
  clearMocks();
});
