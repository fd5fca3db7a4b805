! heat2d.f90: the Fortran twin of examples/c/heat2d.c. A 2-D Jacobi heat
! stencil over MPI (use mpi_f08), checkpointed by cryo through its Fortran
! module. The same arguments give the same residual log, the same final
! grid file and the same output, byte for byte, as the C and Rust versions.
!
! The N x N grid is split into blocks of rows with one halo row above and
! below; a block is grid(0:n-1, 0:rows+1), column index first, so each row
! is contiguous as in C. The initial field is read through a cryo file
! region; both grids and the loop state live in cryo regions, so a
! restarted run carries on from the checkpointed iteration. Rank 0 writes
! the residual of every iteration to its log through a formatted Fortran
! unit, which buffers: cryo flushes every unit at a checkpoint, and on a
! restart the unit is connected again to the fd cryo restored. At the end
! rank 0 gathers the grid, writes it, recomputes the run serially from the
! input and checks that both agree bit for bit.
!
! Build (see README "Fortran"):
!   mpif90 -c rank/fortran/cryo.F90
!   mpif90 -O2 examples/fortran/heat2d.f90 cryo.o -L target/release -lcryo_rank
! Usage: heat2d --n N --iters K --input F --log F --output F [--step-ms MS]
!        heat2d --make-input F --n N
program heat2d
  use, intrinsic :: iso_c_binding, only: c_int
  use, intrinsic :: iso_fortran_env, only: int64, real64, error_unit, output_unit
  use mpi_f08
  use cryo
  implicit none

  interface
    function usleep(us) bind(C, name='usleep') result(rc)
      import :: c_int
      integer(c_int), value :: us
      integer(c_int) :: rc
    end function
  end interface

  ! The loop state in the "meta" region: what the C version's struct holds.
  integer, parameter :: ITERATION = 1, CURRENT = 2, LOG_FD = 3, INITIALISED = 4

  character(len=4096) :: input, log_path, output, make, option, value, fd_path
  integer :: n, me, nranks, first, rows, log_unit, rc, i
  integer(int64) :: iters, step_ms, restored
  integer(int64), pointer :: meta(:)
  real(real64), pointer :: field(:, :), grid_a(:, :), grid_b(:, :), src(:, :), dst(:, :)
  real(real64) :: local, residual
  type(MPI_Request) :: request

  n = 256
  iters = 100
  step_ms = 0
  input = ''
  log_path = ''
  output = ''
  make = ''
  i = 1
  do while (i < command_argument_count())
    call get_command_argument(i, option)
    call get_command_argument(i + 1, value)
    select case (trim(option))
    case ('--n')
      n = int(number(value))
    case ('--iters')
      iters = number(value)
    case ('--step-ms')
      step_ms = number(value)
    case ('--input')
      input = value
    case ('--log')
      log_path = value
    case ('--output')
      output = value
    case ('--make-input')
      make = value
    case default
      write (error_unit, '(a,a)') 'heat2d: unknown option ', trim(option)
      stop 2, quiet=.true.
    end select
    i = i + 2
  end do
  if (n < 4) then
    write (error_unit, '(a)') 'heat2d: --n must be at least 4'
    stop 2, quiet=.true.
  end if
  if (len_trim(make) > 0) then
    call make_input(trim(make), n)
    stop
  end if
  if (len_trim(input) == 0 .or. len_trim(log_path) == 0 .or. len_trim(output) == 0) then
    write (error_unit, '(a)') &
      'usage: heat2d --input F --log F --output F [--n N] [--iters K] [--step-ms MS]'
    stop 2, quiet=.true.
  end if

  call MPI_Init()
  call MPI_Comm_rank(MPI_COMM_WORLD, me)
  call MPI_Comm_size(MPI_COMM_WORLD, nranks)
  if (nranks > n - 2) then
    write (error_unit, '(a)') 'heat2d: too many ranks for the grid'
    call MPI_Abort(MPI_COMM_WORLD, 2)
  end if

  call cryo_init_mpi(MPI_COMM_WORLD, rc)
  if (rc /= CRYO_OK) call die_cryo('cryo_init_mpi', rc)
  restored = cryo_restored_epoch()

  first = int(int(me, int64) * n / nranks)
  rows = int(int(me + 1, int64) * n / nranks) - first
  call cryo_region_real64('input', field, [n, n], rc, file=trim(input), shared=.true.)
  if (rc /= CRYO_OK) call die_cryo('mapping the input', rc)
  call cryo_region_int64('meta', meta, [4], rc)
  if (rc /= CRYO_OK) call die_cryo('meta region', rc)
  call cryo_region_real64('grid-a', grid_a, [n, rows + 2], rc)
  if (rc /= CRYO_OK) call die_cryo('grid region', rc)
  call cryo_region_real64('grid-b', grid_b, [n, rows + 2], rc)
  if (rc /= CRYO_OK) call die_cryo('grid region', rc)
  ! Zero-based, as in C: column 0..n-1, local row 0..rows+1 (0 and rows+1
  ! are the halos).
  field(0:, 0:) => field
  grid_a(0:, 0:) => grid_a
  grid_b(0:, 0:) => grid_b

  if (meta(INITIALISED) == 0) then
    if (restored /= 0) then
      write (error_unit, '(a)') 'heat2d: restarted, but meta was not restored'
      call MPI_Abort(MPI_COMM_WORLD, 1)
    end if
    grid_a(:, 1:rows) = field(:, first:first + rows - 1)
    grid_b = grid_a
    meta(ITERATION) = 0
    meta(CURRENT) = 0
    meta(LOG_FD) = -1
    if (me == 0) then
      open (newunit=log_unit, file=trim(log_path), action='write', status='replace', &
            form='formatted')
      meta(LOG_FD) = fnum(log_unit)
    end if
    meta(INITIALISED) = 1
  else if (me == 0) then
    write (error_unit, '(a,i0,a,i0)') 'heat2d: restarted from epoch ', restored, &
      ' at iteration ', meta(ITERATION)
    ! cryo restored the log's fd at its number, cut back to its size at the
    ! checkpoint: a unit connected to it appends where the run stood.
    write (fd_path, '(a,i0)') '/proc/self/fd/', meta(LOG_FD)
    open (newunit=log_unit, file=trim(fd_path), action='write', status='old', &
          position='append', form='formatted')
  end if

  do while (meta(ITERATION) < iters)
    if (meta(CURRENT) == 0) then
      src => grid_a
      dst => grid_b
    else
      src => grid_b
      dst => grid_a
    end if
    if (me > 0) then
      call MPI_Isend(src(:, 1), n, MPI_DOUBLE_PRECISION, me - 1, 0, MPI_COMM_WORLD, request)
      call MPI_Recv(src(:, 0), n, MPI_DOUBLE_PRECISION, me - 1, 0, MPI_COMM_WORLD, &
                    MPI_STATUS_IGNORE)
      call MPI_Wait(request, MPI_STATUS_IGNORE)
    end if
    if (me + 1 < nranks) then
      call MPI_Isend(src(:, rows), n, MPI_DOUBLE_PRECISION, me + 1, 0, MPI_COMM_WORLD, request)
      call MPI_Recv(src(:, rows + 1), n, MPI_DOUBLE_PRECISION, me + 1, 0, MPI_COMM_WORLD, &
                    MPI_STATUS_IGNORE)
      call MPI_Wait(request, MPI_STATUS_IGNORE)
    end if
    local = sweep(src, dst, n, rows, first)
    call MPI_Allreduce(local, residual, 1, MPI_DOUBLE_PRECISION, MPI_MAX, MPI_COMM_WORLD)
    meta(CURRENT) = ieor(meta(CURRENT), 1_int64)
    meta(ITERATION) = meta(ITERATION) + 1
    if (me == 0) then
      write (log_unit, '(a,i0.5,a,a)') 'iter ', meta(ITERATION), ' residual ', rust_sci(residual)
    end if
    if (step_ms > 0) rc = usleep(int(step_ms * 1000, c_int))
    select case (cryo_checkpoint_point(rc))
    case (CRYO_CHECKPOINTED)
      if (me == 0) write (error_unit, '(a,i0)') 'heat2d: checkpointed after iteration ', &
        meta(ITERATION)
    case (:-1)
      call die_cryo('safe point', rc)
    end select
  end do
  if (me == 0) close (log_unit)

  if (meta(CURRENT) == 0) then
    src => grid_a
  else
    src => grid_b
  end if
  if (me == 0) then
    call finish_on_rank_0(src(:, 1:rows))
  else
    call MPI_Send(src(:, 1:rows), rows * n, MPI_DOUBLE_PRECISION, 0, 1, MPI_COMM_WORLD)
  end if
  if (me == 0 .and. restored /= 0) then
    write (error_unit, '(a,a)') 'heat2d: prefetch: ', cryo_prefetch_status()
  end if
  call cryo_finalize()
  call MPI_Finalize()

contains

  ! Gathers the grid, writes it, and checks it against the serial run.
  subroutine finish_on_rank_0(mine)
    real(real64), intent(in) :: mine(0:, 0:)
    real(real64), allocatable :: full(:, :), a(:, :), b(:, :)
    integer :: other, f, r, u
    integer(int64) :: k, mismatches
    allocate (full(0:n - 1, 0:n - 1))
    full(:, 0:rows - 1) = mine
    do other = 1, nranks - 1
      f = int(int(other, int64) * n / nranks)
      r = int(int(other + 1, int64) * n / nranks) - f
      call MPI_Recv(full(:, f:f + r - 1), r * n, MPI_DOUBLE_PRECISION, other, 1, &
                    MPI_COMM_WORLD, MPI_STATUS_IGNORE)
    end do
    open (newunit=u, file=trim(output), access='stream', form='unformatted', &
          action='write', status='replace')
    write (u) full
    close (u)

    allocate (a(0:n - 1, 0:n + 1), b(0:n - 1, 0:n + 1))
    a = 0
    a(:, 1:n) = field
    b = a
    do k = 1, iters
      residual = sweep(a, b, n, n, 0)
      call swap(a, b)
    end do
    mismatches = count(transfer(a(:, 1:n), 0_int64, size(full)) /= &
                       transfer(full, 0_int64, size(full)))
    if (mismatches > 0) then
      write (error_unit, '(a,i0,a,i0,a)') 'heat2d: self-check FAILED: ', mismatches, &
        ' of ', size(full), ' points differ from the serial run'
      call MPI_Abort(MPI_COMM_WORLD, 1)
    end if
    write (output_unit, '(a,i0,a,i0,a,i0,a,i0,a)') 'heat2d: OK ', n, 'x', n, ' after ', iters, &
      ' iterations on ', nranks, ' ranks'
    flush (output_unit)
  end subroutine

  subroutine swap(a, b)
    real(real64), allocatable, intent(inout) :: a(:, :), b(:, :)
    real(real64), allocatable :: t(:, :)
    call move_alloc(a, t)
    call move_alloc(b, a)
    call move_alloc(t, b)
  end subroutine

  ! One sweep over rows 1..rows of src (with halos) into dst; returns the
  ! largest change. Global boundary rows and columns keep their values.
  ! The parentheses keep C's order of the additions.
  function sweep(src, dst, n, rows, first) result(residual)
    real(real64), intent(in) :: src(0:, 0:)
    real(real64), intent(inout) :: dst(0:, 0:)
    integer, intent(in) :: n, rows, first
    real(real64) :: residual, value, change
    integer :: row, col
    residual = 0
    do row = 1, rows
      if (first + row - 1 == 0 .or. first + row - 1 == n - 1) then
        dst(:, row) = src(:, row)
        cycle
      end if
      dst(0, row) = src(0, row)
      dst(n - 1, row) = src(n - 1, row)
      do col = 1, n - 2
        value = 0.25_real64 * (((src(col, row - 1) + src(col, row + 1)) + src(col - 1, row)) &
                               + src(col + 1, row))
        change = abs(value - src(col, row))
        if (change > residual) residual = change
        dst(col, row) = value
      end do
    end do
  end function

  real(real64) function initial_value(n, row, col)
    integer, intent(in) :: n, row, col
    real(real64) :: x, y
    if (col == 0) then
      initial_value = 100
    else if (col == n - 1 .or. row == 0 .or. row == n - 1) then
      initial_value = 0
    else
      x = real(col, real64) / real(n, real64)
      y = real(row, real64) / real(n, real64)
      initial_value = 50.0_real64 * &
        exp((-((x - 0.6_real64) * (x - 0.6_real64) + (y - 0.4_real64) * (y - 0.4_real64))) &
            * 40.0_real64)
    end if
  end function

  subroutine make_input(path, n)
    character(len=*), intent(in) :: path
    integer, intent(in) :: n
    real(real64), allocatable :: values(:, :)
    integer :: row, col, u
    allocate (values(0:n - 1, 0:n - 1))
    do row = 0, n - 1
      do col = 0, n - 1
        values(col, row) = initial_value(n, row, col)
      end do
    end do
    open (newunit=u, file=path, access='stream', form='unformatted', action='write', &
          status='replace')
    write (u) values
    close (u)
  end subroutine

  ! Rust's {:.17e}, as the C and Rust versions log: 17 decimals, and an
  ! exponent without sign padding or leading zeros ("1.25000000000000000e-3").
  function rust_sci(x) result(text)
    real(real64), intent(in) :: x
    character(len=:), allocatable :: text
    character(len=32) :: es
    integer :: at, exponent
    write (es, '(es25.17e3)') x
    at = index(es, 'E')
    read (es(at + 1:), *) exponent
    write (es(at:), '(a,i0)') 'e', exponent
    text = trim(adjustl(es))
  end function

  integer(int64) function number(text)
    character(len=*), intent(in) :: text
    integer :: status
    read (text, *, iostat=status) number
    if (status /= 0 .or. number < 0) then
      write (error_unit, '(a,a)') 'heat2d: not a number: ', trim(text)
      stop 2, quiet=.true.
    end if
  end function

  subroutine die_cryo(what, code)
    character(len=*), intent(in) :: what
    integer, intent(in) :: code
    write (error_unit, '(a,a,a,a)') 'heat2d: error: ', what, ': ', cryo_strerror(code)
    call MPI_Abort(MPI_COMM_WORLD, 1)
    stop 1
  end subroutine

end program heat2d
